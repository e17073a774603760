"""The transformers modeling backend under every data/tensor-parallel layout on CPU/gloo: from the same
Hugging Face weights, a few AdamW steps of the parallelized model (built on meta, materialized, loaded)
give the losses of plain transformers training on the whole batch in one process.

One launch per world size (2 and 4 ranks) runs every layout of every family in turn; rank 0 writes the
per-step losses as JSON and the tests compare them. Pipeline parallelism runs in both: PP 2 with 1F1B, and
with Interleaved1F1B and ZBVZeroBubble over 4 stages, PP 4, and PP 2 x FSDP 2 and PP 2 x TP 2; for the
tied-embedding family the last stage's head is a copy of the embedding, which must equal it after training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.hf_models import VOCAB, write_hf_model
from tests.integration_tests.test_parallel_components import _job_config, _loss_sum, spawn_ranks

pytestmark = pytest.mark.slow

STEPS, BATCH, SEQ, LR = 3, 4, 32, 3e-3
RTOL = 1e-4
FAMILIES = ("llama", "qwen2")  # qwen2: tied embeddings (and q/k/v bias)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same batch every step, so the loss must fall."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels[:, :2] = -100  # ignored tokens must not count in the normalization
    return [(tokens, labels)] * STEPS


def _reference_losses(folder: str) -> list[float]:
    """Plain transformers: from_pretrained, whole batch, torch AdamW."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
    losses = []
    for tokens, labels in _batches():
        opt.zero_grad()
        loss = _loss_sum(model(tokens).logits, labels) / int((labels != -100).sum())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _parallel_losses(folder: str, case: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The trainer's path: meta model -> parallelize -> to_empty -> init_weights -> load HF weights."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    from torchtitan.distributed.parallel_dims import ParallelDims
    from torchtitan.distributed.utils import dist_sum, loss_parallel_context
    from torchtitan.experiments.transformers_modeling_backend.infra.parallelize import parallelize_hf_transformers
    from torchtitan.experiments.transformers_modeling_backend.model.args import HFTransformerModelArgs
    from torchtitan.experiments.transformers_modeling_backend.model.model import HFTransformerModel
    from torchtitan.experiments.transformers_modeling_backend.model.state_dict_adapter import (
        HFTransformerStateDictAdapter,
    )

    jc = _job_config(case)
    jc.hf_transformers.model = folder
    args = HFTransformerModelArgs().update_from_config(jc)
    with torch.device("meta"):
        model = HFTransformerModel(args)
    dims = ParallelDims.from_job_config(jc, world_size)
    model = parallelize_hf_transformers(model, dims, jc)
    model.to_empty(device="cpu")
    model.init_weights()
    weights = HFTransformerStateDictAdapter(args, folder).from_hf(load_file(os.path.join(folder, "model.safetensors")))
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    params = list(model.parameters())
    embed = model.model.embed_tokens.weight
    opt = torch.optim.AdamW(params, lr=LR, foreach=False)
    dp, dp_rank = dims.dp_world_size, dims.dp_rank()
    rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    losses = []
    for tokens, labels in _batches():
        opt.zero_grad()
        with loss_parallel_context(dims):
            loss = _loss_sum(model(tokens[rows]), labels[rows]) / int((labels != -100).sum())
            loss.backward()
        opt.step()
        loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
        losses.append(float(dist_sum(loss.detach(), dims.get_mesh("dp"))))
    return {
        "losses": losses,
        "n_params": len(params),
        "tied_one_param": model.lm_head.weight is embed and embed in params,
    }


def _pp_losses(folder: str, case: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The trainer's PP path: meta model -> the TrainSpec's pipelining_fn (split, parallelize, schedule) ->
    to_empty -> init_weights -> HF weights per stage (a tied head copy keeps its own init: the tie sync must
    replace it) -> `schedule.step` over microbatches of one row of this data-parallel rank's rows -> tied
    gradients summed -> AdamW. Also returns the largest difference between the tied copies after training."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from torchtitan.distributed.parallel_dims import ParallelDims
    from torchtitan.distributed.utils import dist_sum, loss_parallel_context
    from torchtitan.experiments.transformers_modeling_backend.infra.parallelize import parallelize_hf_transformers
    from torchtitan.experiments.transformers_modeling_backend.infra.pipeline import pipeline_hf_transformers
    from torchtitan.experiments.transformers_modeling_backend.model.args import HFTransformerModelArgs
    from torchtitan.experiments.transformers_modeling_backend.model.model import HFTransformerModel
    from torchtitan.experiments.transformers_modeling_backend.model.state_dict_adapter import (
        HFTransformerStateDictAdapter,
    )

    jc = _job_config(case)
    jc.hf_transformers.model = folder
    p = jc.parallelism
    p.pipeline_parallel_degree, p.pipeline_parallel_schedule = case.get("pp_degree", 2), case["pp"]
    dims = ParallelDims.from_job_config(jc, world_size)
    dp, dp_rank = dims.dp_world_size, dims.dp_rank()
    p.pipeline_parallel_microbatch_size, jc.training.local_batch_size = 1, BATCH // dp
    if case.get("stage_per_unit"):  # 4 stages: embeddings | layer 0 | layer 1 | norm + head
        p.pipeline_parallel_layers_per_stage = 1
        p.pipeline_parallel_first_stage_less_layers = p.pipeline_parallel_last_stage_less_layers = 1
    args = HFTransformerModelArgs().update_from_config(jc)
    with torch.device("meta"):
        model = HFTransformerModel(args)
    n_tokens, pp_mesh = int((_batches()[0][1] != -100).sum()), dims.get_mesh("pp")
    schedule, parts, first, last, tied = pipeline_hf_transformers(
        model, dims, jc, torch.device("cpu"), parallelize_hf_transformers,
        lambda logits, labels: _loss_sum(logits, labels) / n_tokens,
    )
    weights = HFTransformerStateDictAdapter(args, folder).from_hf(load_file(os.path.join(folder, "model.safetensors")))
    for part in parts:
        part.to_empty(device="cpu")
        part.init_weights()
    copies = {id(q) for q in tied.uncounted()}
    for part in parts:
        skip = {k for k, q in part.named_parameters() if id(q) in copies}
        own = {k: weights[k] for k in part.state_dict() if k not in skip}
        set_model_state_dict(part, own, options=StateDictOptions(full_state_dict=True, strict=not skip))
    tied.sync_weights()
    opt = torch.optim.AdamW([q for part in parts for q in part.parameters()], lr=LR, foreach=False)
    rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    losses = []
    for tokens, labels in _batches():
        opt.zero_grad()
        mb_losses: list[torch.Tensor] = []
        with loss_parallel_context(dims):
            schedule.step(*((tokens[rows],) if first else ()), target=labels[rows] if last else None, losses=mb_losses)
        tied.sync_grads()
        opt.step()
        loss = torch.stack([_full(x) for x in mb_losses]).sum() if last else torch.zeros(())
        losses.append(dist_sum(dist_sum(loss.detach(), pp_mesh), dims.get_mesh("dp")))
    result = {"losses": losses, "stages": len(parts), "tied_copies": dist_sum(len(copies), pp_mesh)}
    if args.tie_word_embeddings:  # the last stage's head against the first stage's embedding, on the last
        embed = _full(parts[0].model.embed_tokens.weight) if first else torch.empty(VOCAB, args.hf_config.hidden_size)
        dist.broadcast(embed.detach(), src=int(pp_mesh.mesh[0]), group=pp_mesh.get_group())
        diff = (_full(parts[-1].lm_head.weight) - embed).abs().max() if last else torch.zeros(())
        result["tied_copy_diff"] = dist_sum(diff.detach(), pp_mesh)
    return result


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _worker(rank: int, world_size: int, port: int, folders: dict[str, str], cases: dict[str, dict], out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch.distributed as dist

    from torchtitan.config import JobConfig
    from torchtitan.distributed.utils import init_distributed

    init_distributed(JobConfig().comm)
    results: dict[str, Any] = {}
    for family, folder in folders.items():
        if rank == 0:
            results[f"{family}/reference"] = {"losses": _reference_losses(folder)}
        for name, case in cases.items():
            run = _pp_losses if "pp" in case else _parallel_losses
            results[f"{family}/{name}"] = run(folder, case, world_size)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _launch(world_size: int, cases: dict[str, dict], tmp_path: Path) -> dict[str, Any]:
    folders = {f: str(write_hf_model(tmp_path / f, f, tokenizer=False)) for f in FAMILIES}
    return spawn_ranks(_worker, world_size, (folders, cases), tmp_path / "results.json")


TWO_RANK_CASES = {
    "fsdp2": {"dp_shard": 2},
    "tp2": {"tp": 2},
    "ddp2": {"dp_replicate": 2},
    "tp2_no_sp_ac_op": {"tp": 2, "sp": False, "ac": "selective", "ac_option": "op"},
    "fsdp2_ac_full_compile": {"dp_shard": 2, "ac": "full", "compile": True, "backend": "aot_eager"},
    "tp2_ac_full_compile": {"tp": 2, "ac": "full", "compile": True, "backend": "aot_eager"},
    "pp2_1f1b": {"pp": "1F1B"},
    "pp2_interleaved_4_stages": {"pp": "Interleaved1F1B", "stage_per_unit": True},
    "pp2_zbv_4_stages": {"pp": "ZBVZeroBubble", "stage_per_unit": True},  # rank 0 holds both tied copies
}
FOUR_RANK_CASES = {
    "fsdp2_tp2_ac_every2": {"dp_shard": 2, "tp": 2, "ac": "selective", "ac_option": "2"},
    "pp2_fsdp2": {"pp": "1F1B", "dp_shard": 2},
    "pp2_tp2_no_sp_gpipe": {"pp": "GPipe", "tp": 2, "sp": False},
    # first and last stage on PP ranks 0 and 3: the tied copies get a group of their own
    "pp4_1f1b": {"pp": "1F1B", "pp_degree": 4, "stage_per_unit": True},
}


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _launch(2, TWO_RANK_CASES, tmp_path_factory.mktemp("hf_two"))


@pytest.fixture(scope="module")
def four_rank(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _launch(4, FOUR_RANK_CASES, tmp_path_factory.mktemp("hf_four"))


def _assert_matches_reference(results: dict[str, Any], family: str, case: str) -> None:
    expected = results[f"{family}/reference"]["losses"]
    result = results[f"{family}/{case}"]
    actual = result["losses"]
    assert len(actual) == len(expected) == STEPS
    assert expected[-1] < expected[0]  # the steps trained
    for step, (a, e) in enumerate(zip(actual, expected), 1):
        assert abs(a - e) <= RTOL * abs(e), (family, case, step, actual, expected)
    if family == "qwen2" and "pp" in case:  # the last stage's head: a copy, equal to the embedding
        assert result["tied_copies"] == 1 and result["tied_copy_diff"] == 0.0, result["tied_copy_diff"]
    elif family == "qwen2":
        assert result["tied_one_param"], "the tied output head is no longer the embedding"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(c for c in TWO_RANK_CASES if "pp" not in TWO_RANK_CASES[c]))
def test_two_rank_layouts_match_transformers(two_rank: dict[str, Any], family: str, case: str) -> None:
    _assert_matches_reference(two_rank, family, case)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(c for c in TWO_RANK_CASES if "pp" in TWO_RANK_CASES[c]))
def test_pipeline_parallel_matches_transformers(two_rank: dict[str, Any], family: str, case: str) -> None:
    _assert_matches_reference(two_rank, family, case)
    expected_stages = 2 if TWO_RANK_CASES[case].get("stage_per_unit") else 1
    assert two_rank[f"{family}/{case}"]["stages"] == expected_stages


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(FOUR_RANK_CASES))
def test_four_rank_layouts_match_transformers(four_rank: dict[str, Any], family: str, case: str) -> None:
    _assert_matches_reference(four_rank, family, case)
