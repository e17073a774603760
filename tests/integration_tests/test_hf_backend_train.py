"""The transformers modeling backend through run_train.sh with its TOML: sharded HF safetensors (with an
index) load into an FSDP x TP layout, the first loss is the loss transformers computes on the same batch,
training lowers it, and the last step is exported as a folder transformers loads."""

import shutil
from pathlib import Path

import pytest
import torch

from tests.hf_models import write_hf_model
from tests.integration_tests.runner import REPO, TINY, assert_losses_close, run_train

pytestmark = pytest.mark.slow
CONFIG = REPO / "torchtitan/experiments/transformers_modeling_backend/train_configs/debug_model.toml"


def _first_batch_loss(folder: Path, overrides: list[str], global_batch: int) -> float:
    """transformers' mean token loss on the job's first global batch (the layout-independent order: the
    same windows on one data-parallel rank)."""
    import transformers

    import torchtitan.builtins  # noqa: F401
    from torchtitan.config import ConfigManager
    from torchtitan.protocols.train_spec import get_train_spec

    jc = ConfigManager().parse_args(["--job.config_file", str(CONFIG), *overrides])
    jc.training.local_batch_size = global_batch
    spec = get_train_spec(jc.model.name)
    loader = spec.build_dataloader_fn(1, 0, spec.build_tokenizer_fn(jc), jc)
    inputs, labels = next(iter(loader))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = model(inputs["input"]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).item()


def test_toml_run_loads_sharded_hf_weights_into_fsdp_tp_and_exports(tmp_path):
    folder = write_hf_model(tmp_path / "llama", "llama")
    # re-save in several shards with model.safetensors.index.json
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    overrides = [
        *TINY, "--training.steps", "3", "--training.local_batch_size", "2",
        "--hf_transformers.model", str(folder), "--model.hf_assets_path", str(folder),
    ]
    run = run_train(
        tmp_path / "out", *overrides, "--parallelism.data_parallel_shard_degree", "2",
        "--parallelism.tensor_parallel_degree", "2", ngpu=4, config=CONFIG,
    )
    losses = run.losses()
    assert sorted(losses) == [1, 2, 3] and losses[3] < losses[1]
    expected = _first_batch_loss(folder, overrides, global_batch=4)
    assert abs(losses[1] - expected) <= 1e-4 * expected, (losses[1], expected)
    export = tmp_path / "out" / "checkpoint" / "step-3"
    assert (export / "tokenizer.json").is_file() and (export / "config.json").is_file()
    trained = transformers.AutoModelForCausalLM.from_pretrained(export)
    tokens = torch.arange(32).view(1, 32)
    with torch.no_grad():
        assert torch.isfinite(trained(tokens).logits).all()


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory) -> list[str]:
    """Overrides for 4 steps of a tiny HF Llama (llama3 rope scaling) with sharp attention, so that wrong
    positions or keys would change the loss."""
    import transformers

    folder = write_hf_model(tmp_path_factory.mktemp("sharp_llama"), "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    model.save_pretrained(folder)
    return [
        *TINY, "--training.steps", "4", "--training.local_batch_size", "2",
        "--hf_transformers.model", str(folder), "--model.hf_assets_path", str(folder), "--checkpoint.no_last_save_in_hf",
    ]


@pytest.fixture(scope="module")
def single(tmp_path_factory, sharp_llama) -> dict[int, float]:
    return run_train(tmp_path_factory.mktemp("single"), *sharp_llama, config=CONFIG).losses()


def test_context_parallel_matches_one_process(tmp_path, sharp_llama, single):
    """CP 2 (our all-gather-KV attention inside transformers' Llama layers, each rank's true positions for
    the RoPE) follows the one-process losses from the same HF weights."""
    cp2 = run_train(tmp_path, *sharp_llama, "--parallelism.context_parallel_degree", "2", ngpu=2, config=CONFIG)
    assert "context parallel degree 2, load balancer headtail, attention allgather_kv" in cp2.stderr
    assert_losses_close(cp2.losses(), single, rtol=1e-4)


def test_float8_tracks_fp32_and_fsdp_matches_one_process(tmp_path, sharp_llama, single):
    """Float8 (emulated on CPU) converts the decoder's Linear layers, the TOML keeps lm_head in high
    precision; its losses track fp32, and FSDP 2 float8 tracks one-process float8 (not to 1e-4: tensorwise
    activation scales come from each rank's own rows)."""
    float8 = [*sharp_llama, "--model.converters", "quantize.linear.float8"]
    one = run_train(tmp_path / "one", *float8, config=CONFIG)
    assert "converted 14 of 15 Linear layers; skipped 1: lm_head (filter_fqns)" in one.stderr
    assert_losses_close(one.losses(), single, rtol=0, atol=5e-2)
    fsdp2 = run_train(tmp_path / "fsdp2", *float8, "--parallelism.data_parallel_shard_degree", "2",
                      "--training.local_batch_size", "1", ngpu=2, config=CONFIG)
    assert_losses_close(fsdp2.losses(), one.losses(), rtol=0, atol=2e-2)


def test_tied_embeddings_under_pp2_match_one_process_resume_and_export(tmp_path):
    """Qwen2 (tied embeddings) from the same HF weights under PP 2 (1F1B; the last stage holds a copy of the
    embedding as its head): every step's loss and gradient norm (clipping active: max_norm 1) within 1e-4 of
    one process; resuming its step-2 checkpoint repeats steps 3-4; its HF export has no lm_head and equals
    the one-process export."""
    from safetensors.torch import load_file

    from tests.integration_tests.runner import assert_losses_close

    folder = write_hf_model(tmp_path / "qwen2", "qwen2")
    base = [*TINY, "--training.steps", "4", "--hf_transformers.model", str(folder),
            "--model.hf_assets_path", str(folder)]
    pp = ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_schedule", "1F1B"]
    single = run_train(tmp_path / "single", *base, config=CONFIG)
    piped = run_train(tmp_path / "pp", *base, *pp, "--checkpoint.interval", "2", ngpu=2, config=CONFIG)
    assert_losses_close(piped.losses(), single.losses(), 1e-4)
    norms = [{r["step"]: r["grad_norm"] for r in run.metrics()} for run in (piped, single)]
    assert_losses_close(*norms, 1e-4)
    assert max(norms[1].values()) > 1.0
    resumed_folder = tmp_path / "resumed"
    shutil.copytree(tmp_path / "pp" / "checkpoint" / "step-2", resumed_folder / "checkpoint" / "step-2")
    resumed = run_train(resumed_folder, *base, *pp, ngpu=2, config=CONFIG)
    assert_losses_close(resumed.losses(), single.losses(), 1e-4, steps=[3, 4])
    exported, expected = (
        load_file(tmp_path / run / "checkpoint" / "step-4" / "model.safetensors") for run in ("pp", "single")
    )
    assert sorted(exported) == sorted(expected) and "lm_head.weight" not in exported
    for key, value in expected.items():
        assert (exported[key] - value).abs().max().item() <= 1e-5, key
