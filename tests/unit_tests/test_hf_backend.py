"""The transformers modeling backend in one process: the documented snippet, logits equal transformers'
for every supported family, training equal to a plain transformers loop, load -> train -> export ->
from_pretrained, the fake-backend dry run of a 7B-shaped config, and the one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import torchtitan.builtins  # noqa: F401
from tests.hf_models import FAMILIES, VOCAB, write_hf_model, write_tokenizer
from torchtitan import train
from torchtitan.config import ConfigError, ConfigManager, JobConfig
from torchtitan.distributed.parallel_dims import ParallelDims, validate_model
from torchtitan.protocols.train_spec import build_meta_model, get_train_spec

transformers = pytest.importorskip("transformers")
NAME = "transformers_modeling_backend"
SEQ = 48  # longer than the llama fixture's original_max_position_embeddings: rope scaling matters


def job(folder: Path | str, flavor: str = "full", **training: object) -> JobConfig:
    jc = JobConfig()
    jc.model.name, jc.model.flavor, jc.model.hf_assets_path = NAME, flavor, str(folder)
    jc.hf_transformers.model = str(folder)
    jc.training.seq_len = SEQ
    for key, value in training.items():
        setattr(jc.training, key, value)
    return jc


def ours_from_hf(folder: Path) -> torch.nn.Module:
    """The trainer's path on one process: meta model -> to_empty -> init_weights -> HF weights."""
    spec = get_train_spec(NAME)
    args, model = build_meta_model(spec, job(folder))
    model.to_empty(device="cpu")
    model.init_weights()
    model.load_state_dict(spec.state_dict_adapter(args, str(folder)).from_hf(load_file(folder / "model.safetensors")))
    return model


def reference(folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, SEQ), generator=g), torch.randint(0, VOCAB, (2, SEQ), generator=g)


def test_documented_snippet_with_a_local_folder(tmp_path):
    from torchtitan.config.job_config import JobConfig
    from torchtitan.experiments.transformers_modeling_backend.job_config import HFTransformers
    from torchtitan.experiments.transformers_modeling_backend.model.args import (
        HFTransformerModelArgs,
        TitanDenseModelArgs,
    )
    from torchtitan.experiments.transformers_modeling_backend.model.model import HFTransformerModel

    folder = write_hf_model(tmp_path / "qwen2", "qwen2", tokenizer=False)
    job_config = JobConfig()
    job_config.hf_transformers = HFTransformers(model=str(folder))
    titan_args = TitanDenseModelArgs()
    model_args = HFTransformerModelArgs(titan_dense_args=titan_args).update_from_config(job_config)
    model = HFTransformerModel(model_args)
    assert (model_args.dim, model_args.n_layers, model_args.n_heads, model_args.n_kv_heads) == (64, 2, 4, 2)
    assert model_args.architecture == "Qwen2ForCausalLM" and model_args.vocab_size == VOCAB
    assert type(model.model.layers[0].self_attn).__module__.startswith("transformers.")
    assert set(model.state_dict()) == set(reference(folder).state_dict())
    assert model(batch()[0]).shape == (2, SEQ, VOCAB)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(tmp_path, family):
    folder = write_hf_model(tmp_path / family, family, tokenizer=False)
    ours, theirs = ours_from_hf(folder), reference(folder)
    tokens = batch()[0]
    with torch.no_grad():
        diff = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert diff <= 1e-5, diff
    if family in ("qwen2", "smollm"):  # tied: one parameter
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
        assert len(list(ours.parameters())) == len(list(theirs.parameters()))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_five_steps_equal_a_plain_transformers_loop(tmp_path, family):
    folder = write_hf_model(tmp_path / family, family, tokenizer=False)
    ours, theirs = ours_from_hf(folder), reference(folder)
    losses: dict[str, list[float]] = {"ours": [], "theirs": []}
    for name, model, logits_of in [("ours", ours, lambda out: out), ("theirs", theirs, lambda out: out.logits)]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
        for step in range(5):
            tokens, labels = batch(step)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(logits_of(model(tokens)).flatten(0, 1), labels.flatten())
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert max(abs(a - b) for a, b in zip(losses["ours"], losses["theirs"])) <= 1e-5, losses


def test_debugmodel_flavor_shrinks_the_architecture(tmp_path):
    folder = write_hf_model(tmp_path / "qwen3", "qwen3", tokenizer=False)
    args, model = build_meta_model(get_train_spec(NAME), job(folder, flavor="debugmodel"))
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim) == (256, 2, 8, 4, 32)
    assert args.architecture == "Qwen3ForCausalLM" and model.model.layers[0].self_attn.q_norm.weight.shape == (32,)
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(batch()[0])).all()


def test_custom_config_module_flag_is_accepted(tmp_path):
    module = "torchtitan.experiments.transformers_modeling_backend.job_config"
    config = ConfigManager().parse_args(
        ["--job.custom_config_module", module, "--model.name", NAME, "--hf_transformers.model", str(tmp_path)]
    )
    assert config.hf_transformers.model == str(tmp_path)


def _config_error(folder: Path | str, **training: object) -> str:
    with pytest.raises(ConfigError) as info:
        build_meta_model(get_train_spec(NAME), job(folder, **training))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    assert "pass a local folder that holds config.json" in _config_error("Qwen/Qwen2.5-7B")
    assert "hf_transformers.model is empty" in _config_error("")
    (tmp_path / "no_config").mkdir()
    assert "folder without config.json" in _config_error(tmp_path / "no_config")
    gpt2 = transformers.GPT2Config(n_layer=1)
    gpt2.architectures = ["GPT2LMHeadModel"]
    gpt2.save_pretrained(tmp_path / "gpt2")
    message = _config_error(tmp_path / "gpt2")
    assert "GPT2LMHeadModel" in message and "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM" in message
    windowed = transformers.MistralConfig(num_hidden_layers=1, sliding_window=16)
    windowed.architectures = ["MistralForCausalLM"]
    windowed.save_pretrained(tmp_path / "windowed")
    assert "sliding-window attention (window 16)" in _config_error(tmp_path / "windowed")
    folder = write_hf_model(tmp_path / "llama", "llama", tokenizer=False)
    jc = job(folder)
    jc.parallelism.tensor_parallel_degree = 4
    args, _ = build_meta_model(get_train_spec(NAME), jc)
    with pytest.raises(ConfigError, match=r"tensor_parallel_degree=4 must divide the model's num_key_value_heads=2"):
        validate_model(ParallelDims.from_job_config(jc, 4), args, jc)


def test_pp_with_sequence_parallel_is_refused_in_one_line(tmp_path):
    """A stage without the embedding would see its sequence shard as the sequence (and build wrong positions)."""
    from torchtitan.experiments.transformers_modeling_backend.infra.parallelize import parallelize_hf_transformers

    jc = job(write_hf_model(tmp_path / "llama", "llama", tokenizer=False))
    jc.parallelism.pipeline_parallel_degree = jc.parallelism.tensor_parallel_degree = 2
    _, model = build_meta_model(get_train_spec(NAME), jc)
    with pytest.raises(ConfigError, match=r"^--parallelism.pipeline_parallel_degree=2 with tensor_parallel_degree=2 .*"
                                          r"pass --parallelism.disable_sequence_parallel$"):
        parallelize_hf_transformers(model, ParallelDims.from_job_config(jc, 4), jc)


def test_cp_with_attention_dropout_is_refused_in_one_line(tmp_path):
    """Context-parallel attention applies no dropout: a config that asks for it is refused before training."""
    import types

    from torchtitan.experiments.transformers_modeling_backend.infra.parallelize import apply_hf_cp

    _, model = build_meta_model(get_train_spec(NAME), job(write_hf_model(tmp_path / "llama", "llama", tokenizer=False)))
    model.config.attention_dropout = 0.1
    with pytest.raises(ConfigError, match=r"^--parallelism.context_parallel_degree=2: the model's config has "
                                          r"attention_dropout=0.1, .* use context_parallel_degree 1$"):
        apply_hf_cp(model, types.SimpleNamespace(cp=2))


def test_trainer_reports_an_uncached_hub_id_in_one_line(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(train, "init_logger", lambda: None)
    monkeypatch.setattr(train.logger, "handlers", [])
    code = train.main(["--model.name", NAME, "--hf_transformers.model", "Qwen/Qwen2.5-7B", "--training.dataset", "shakespeare",
                       "--job.dump_folder", str(tmp_path / "out")])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "pass a local folder that holds config.json" in lines[0], err[-2000:]


def test_load_train_export_then_from_pretrained_gives_our_logits(tmp_path, monkeypatch):
    """initial_load_in_hf -> 2 steps -> last_save_in_hf; transformers loads the export (config.json,
    tokenizer, tied head not stored) and its logits equal the trained model's."""
    monkeypatch.setattr(train.logger, "handlers", [])
    folder = write_hf_model(tmp_path / "qwen2", "qwen2")
    config = ConfigManager().parse_args([
        "--model.name", NAME, "--model.flavor", "full", "--hf_transformers.model", str(folder),
        "--model.hf_assets_path", str(folder), "--job.dump_folder", str(tmp_path / "out"),
        "--training.dataset", "shakespeare", "--training.seq_len", str(SEQ), "--training.local_batch_size", "2",
        "--training.steps", "2", "--training.mixed_precision_param", "float32", "--lr_scheduler.warmup_steps", "1",
        "--checkpoint.enable", "--checkpoint.initial_load_in_hf", "--checkpoint.last_save_in_hf",
    ])
    trainer = train.Trainer(config)
    try:
        trainer.train()
    finally:
        trainer.close()
    model = trainer.model_parts[0]
    export = tmp_path / "out" / "checkpoint" / "step-2"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(export))
    with safe_open(export / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    loaded = reference(export)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not torch.equal(loaded.model.embed_tokens.weight, reference(folder).model.embed_tokens.weight)  # trained
    tokens = batch()[0]
    with torch.no_grad():
        assert (model(tokens) - loaded(tokens).logits).abs().max().item() <= 1e-5
    assert json.loads((export / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]


def test_tied_head_of_a_last_pipeline_stage_reads_and_writes_as_the_embedding():
    """A tied model's state: `lm_head.weight` is not stored; a stage holding only the head (PP's last)
    stands for the embedding, and reading restores the head from it."""
    from torchtitan.experiments.transformers_modeling_backend.model.args import HFTransformerModelArgs
    from torchtitan.experiments.transformers_modeling_backend.model.state_dict_adapter import (
        HFTransformerStateDictAdapter,
    )

    args = HFTransformerModelArgs()
    args.tie_word_embeddings = True
    adapter = HFTransformerStateDictAdapter(args, None)
    embed, head, norm = torch.zeros(2), torch.ones(2), torch.full((2,), 2.0)
    one_process = {"model.embed_tokens.weight": embed, "lm_head.weight": embed}
    assert adapter.to_hf(one_process) == {"model.embed_tokens.weight": embed}
    last_stage = adapter.to_hf({"lm_head.weight": head, "model.norm.weight": norm})
    assert last_stage == {"model.embed_tokens.weight": head, "model.norm.weight": norm}
    assert adapter.from_hf(last_stage)["lm_head.weight"] is head


QWEN2_5_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=32768, tie_word_embeddings=False,
)


def test_fake_backend_dry_run_of_a_qwen2_5_7b_config(tmp_path):
    from torchtitan.distributed.fake_backend import dry_run

    folder = tmp_path / "qwen2_5_7b"
    config = transformers.Qwen2Config(**QWEN2_5_7B)
    config.architectures = ["Qwen2ForCausalLM"]
    config.save_pretrained(folder)
    write_tokenizer(folder)
    jc = job(folder, seq_len=4096)
    jc.parallelism.data_parallel_shard_degree, jc.parallelism.tensor_parallel_degree = 16, 4
    result = dry_run(jc, world_size=64)
    assert 7.6e9 < result["params"] < 7.7e9  # Qwen2.5-7B: 7.62B
    assert result["params"] <= result["params_per_rank"] * 64 < 1.001 * result["params"]  # sharded 64 ways
    # TP 8 does not divide Qwen2.5-7B's 28 query (and 4 key/value) heads: a one-line error, not a crash
    jc.parallelism.data_parallel_shard_degree, jc.parallelism.tensor_parallel_degree = 8, 8
    with pytest.raises(ConfigError, match="tensor_parallel_degree=8 must divide the model's num_attention_heads=28"):
        dry_run(jc, world_size=64)
