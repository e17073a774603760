"""Multi-process parity of the parallel stack on CPU/gloo against a single-process reference.

Each launch spawns 2 or 4 ranks (one intra-op thread each) that run several layouts in turn. For each
layout, every rank builds the same tiny Llama (same seed), keeps an unparallelized copy as the
reference for the full global batch, parallelizes the other copy, runs one forward/backward on its
data-parallel slice with loss = token-loss sum / global label-token count, clips gradients, and
records the loss/gradient/norm differences against the reference. Rank 0 writes them as JSON; the
tests assert on those numbers.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5
MAX_NORM = 0.05  # small enough that clipping is active
BATCH, SEQ, VOCAB = 4, 32, 256


def _tiny_args() -> Any:
    from torchtitan.models.llama3.model.args import TransformerModelArgs

    return TransformerModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32, max_seq_len=SEQ
    )


def _job_config(case: dict[str, Any]) -> Any:
    from torchtitan.config import JobConfig

    jc = JobConfig()
    p = jc.parallelism
    p.data_parallel_replicate_degree = case.get("dp_replicate", 1)
    p.data_parallel_shard_degree = case.get("dp_shard", 1)
    p.tensor_parallel_degree = case.get("tp", 1)
    p.disable_loss_parallel = not case.get("loss_parallel", True)
    p.disable_sequence_parallel = not case.get("sp", True)
    p.fsdp_reshard_after_forward = case.get("reshard", "default")
    jc.training.seq_len = SEQ
    jc.training.mixed_precision_param = "float32"
    jc.training.enable_cpu_offload = case.get("offload", False)
    jc.activation_checkpoint.mode = case.get("ac", "none")
    jc.activation_checkpoint.selective_ac_option = case.get("ac_option", "1")
    jc.compile.enable = case.get("compile", False)
    jc.compile.backend = case.get("backend", "inductor")
    return jc


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels[:, :3] = -100  # ignored tokens must not count in the normalization
    return tokens, labels


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum", ignore_index=-100
    )


def _clean(fqn: str) -> str:
    return fqn.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        _clean(n): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
        for n, p in model.named_parameters()
    }


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _run_case(case: dict[str, Any], world_size: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One layout: differences to the single-process reference, and the parallel (unclipped) grads."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    from torchtitan.distributed.parallel_dims import ParallelDims
    from torchtitan.distributed.utils import clip_grad_norm_, dist_sum, loss_parallel_context
    from torchtitan.models.llama3.infra.parallelize import parallelize_llama
    from torchtitan.models.llama3.model.model import Transformer

    jc = _job_config(case)
    torch.manual_seed(0)
    model = Transformer(_tiny_args())
    model.init_weights()
    reference = copy.deepcopy(model)
    initial = copy.deepcopy(model.state_dict())
    tokens, labels = _batch()
    n_tokens = int((labels != -100).sum())

    ref_loss = _loss_sum(reference(tokens), labels) / n_tokens
    ref_loss.backward()
    ref_grads = _full_grads(reference)
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
    ref_clipped = _full_grads(reference)

    dims = ParallelDims.from_job_config(jc, world_size)
    if case.get("meta"):  # the trainer's path: meta model -> parallelize -> to_empty -> init -> load
        with torch.device("meta"):
            model = Transformer(_tiny_args())
        model = parallelize_llama(model, dims, jc)
        model.to_empty(device="cpu")
        model.init_weights()
        set_model_state_dict(model, initial, options=StateDictOptions(full_state_dict=True))
    else:
        model = parallelize_llama(model, dims, jc)
    dp, dp_rank = dims.dp_world_size, dims.dp_rank()
    rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    with loss_parallel_context(dims):
        loss = _loss_sum(model(tokens[rows]), labels[rows]) / n_tokens
        loss.backward()
    loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
    global_loss = dist_sum(loss, dims.get_mesh("dp"))
    grads = _full_grads(model)
    norm = clip_grad_norm_(model.parameters(), MAX_NORM)
    diffs = {
        "loss_diff": abs(global_loss - ref_loss.item()),
        "grad_diff": _max_diff(grads, ref_grads),
        "norm_diff": abs(norm.item() - ref_norm.item()),
        "clipped_grad_diff": _max_diff(_full_grads(model), ref_clipped),
        "ref_norm": ref_norm.item(),
    }
    return diffs, grads


def _reductions(rank: int, world_size: int) -> dict[str, float]:
    """The logging reductions of an fp32 scalar: the results, and the input afterwards (must be unchanged)."""
    from torch.distributed.device_mesh import init_device_mesh

    from torchtitan.distributed.utils import dist_max, dist_mean, dist_sum

    mesh = init_device_mesh("cpu", (world_size,))
    value = torch.tensor(float(rank + 1))
    return {
        "sum": dist_sum(value, mesh),
        "max": dist_max(value, mesh),
        "mean": dist_mean(value, mesh),
        "input_after": value.item(),
        "input_before": float(rank + 1),
    }


def _worker(rank: int, world_size: int, port: int, cases: dict[str, dict[str, Any]], out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch.distributed as dist

    from torchtitan.config import JobConfig
    from torchtitan.distributed.parallel_dims import ParallelDims
    from torchtitan.distributed.utils import init_distributed, set_pg_timeouts

    init_distributed(JobConfig().comm)
    results: dict[str, dict[str, float]] = {"threads": {"per_rank": torch.get_num_threads()}}
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for name, case in cases.items():
        results[name], grads[name] = _run_case(case, world_size)
        if "same_as" in case:  # neither AC nor the meta-init path may change a single bit of the gradients
            results[name]["diff_to_same_layout"] = _max_diff(grads[name], grads[case["same_as"]])
    results["reduce"] = _reductions(rank, world_size)
    comm = JobConfig().comm
    set_pg_timeouts(comm.train_timeout_seconds, ParallelDims(1, world_size, 1, 1, 1, 1, 1, world_size))
    group = dist.group.WORLD._get_backend(torch.device("cpu"))
    results["timeouts"] = {"world": group.options._timeout.total_seconds(), "expected": comm.train_timeout_seconds}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Any, world_size: int, args: tuple, out: Path) -> dict[str, Any]:
    """Run `worker(rank, world_size, port, *args, str(out))` on `world_size` spawned ranks; the JSON at `out`."""
    user_threads = os.environ.pop("OMP_NUM_THREADS", None)  # ranks must pick 1 thread themselves
    try:
        mp.start_processes(
            worker, args=(world_size, _free_port(), *args, str(out)), nprocs=world_size, start_method="spawn"
        )
    finally:
        if user_threads is not None:
            os.environ["OMP_NUM_THREADS"] = user_threads
    return json.loads(out.read_text())


def _launch(world_size: int, cases: dict[str, dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    return spawn_ranks(_worker, world_size, (cases,), tmp_path / f"results_{world_size}.json")


TWO_RANK_CASES: dict[str, dict[str, Any]] = {
    "fsdp2": {"dp_shard": 2},
    "fsdp2_reshard_always": {"dp_shard": 2, "reshard": "always"},
    "fsdp2_reshard_never": {"dp_shard": 2, "reshard": "never"},
    "fsdp2_cpu_offload": {"dp_shard": 2, "offload": True},
    "ddp2": {"dp_replicate": 2},
    "tp2": {"tp": 2},
    "tp2_no_loss_parallel": {"tp": 2, "loss_parallel": False},
    "tp2_no_sp": {"tp": 2, "sp": False},
    "tp2_no_sp_no_loss_parallel": {"tp": 2, "sp": False, "loss_parallel": False},
    "fsdp2_ac_full": {"dp_shard": 2, "ac": "full", "same_as": "fsdp2"},
    "fsdp2_ac_every2": {"dp_shard": 2, "ac": "selective", "ac_option": "2", "same_as": "fsdp2"},
    "fsdp2_ac_op": {"dp_shard": 2, "ac": "selective", "ac_option": "op", "same_as": "fsdp2"},
    "tp2_ac_op": {"tp": 2, "ac": "selective", "ac_option": "op", "same_as": "tp2"},
    "tp2_meta_init": {"tp": 2, "meta": True, "same_as": "tp2"},
    "ddp2_meta_init": {"dp_replicate": 2, "meta": True, "same_as": "ddp2"},
    # TP+SP with per-block compile needs the embedding-output copy in parallelize_llama, and full AC must
    # wrap the compiled block (traced, the checkpoint saves the DeviceMesh); aot_eager reproduces both
    # failure modes without inductor's compile time.
    "tp2_ac_full_compile_aot_eager": {"tp": 2, "ac": "full", "compile": True, "backend": "aot_eager"},
    "fsdp2_compile_inductor_ac_full": {"dp_shard": 2, "compile": True, "ac": "full"},
}
FOUR_RANK_CASES: dict[str, dict[str, Any]] = {
    "fsdp2_tp2": {"dp_shard": 2, "tp": 2},
    "fsdp2_tp2_no_sp": {"dp_shard": 2, "tp": 2, "sp": False},
    "fsdp2_tp2_meta_init_ac_op": {"dp_shard": 2, "tp": 2, "meta": True, "ac": "selective", "ac_option": "op",
                                  "same_as": "fsdp2_tp2"},
    "hsdp2x2": {"dp_replicate": 2, "dp_shard": 2},
}


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _launch(2, TWO_RANK_CASES, tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def four_rank(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _launch(4, FOUR_RANK_CASES, tmp_path_factory.mktemp("four"))


def _assert_parity(r: dict[str, float]) -> None:
    for key in ("loss_diff", "grad_diff", "norm_diff", "clipped_grad_diff"):
        assert r[key] < TOL, (key, r)
    assert r["ref_norm"] > MAX_NORM  # clipping was active, so the clipped grads were compared too


@pytest.mark.parametrize("case", sorted(TWO_RANK_CASES))
def test_two_rank_parity(two_rank: dict[str, Any], case: str) -> None:
    _assert_parity(two_rank[case])
    if "same_as" in TWO_RANK_CASES[case]:
        assert two_rank[case]["diff_to_same_layout"] == 0.0


@pytest.mark.parametrize("case", sorted(FOUR_RANK_CASES))
def test_four_rank_parity(four_rank: dict[str, Any], case: str) -> None:
    _assert_parity(four_rank[case])
    if "same_as" in FOUR_RANK_CASES[case]:
        assert four_rank[case]["diff_to_same_layout"] == 0.0


def test_one_intra_op_thread_per_rank(two_rank: dict[str, Any]) -> None:
    assert two_rank["threads"]["per_rank"] == 1


def test_logging_reductions_leave_their_input_alone(two_rank: dict[str, Any]) -> None:
    """dist_sum must not turn the trainer's loss_sum into the global sum (the max loss came out D times too
    large): rank 0 holds 1.0 before and after; the sum of 1 and 2 is 3, the max 2, the mean 1.5."""
    r = two_rank["reduce"]
    assert r["input_after"] == r["input_before"] == 1.0
    assert (r["sum"], r["max"], r["mean"]) == (3.0, 2.0, 1.5)


def test_train_timeout_applied_after_init(two_rank: dict[str, Any]) -> None:
    assert two_rank["timeouts"]["world"] == two_rank["timeouts"]["expected"] == 100


def _dry_run(ngpu: int, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NGPU": str(ngpu)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torchtitan.distributed.fake_backend", "--training.seq_len", "256", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_fake_backend_dry_run_64_ranks() -> None:
    run = _dry_run(64, "--parallelism.data_parallel_shard_degree", "8", "--parallelism.tensor_parallel_degree", "8")
    assert run.returncode == 0, run.stderr
    log = run.stdout + run.stderr
    assert "world_size=64: dp_replicate=1, dp_shard=8, cp=1, tp=8" in log
    assert "mesh: {'dp_shard': 8, 'tp': 8}" in log
    # debugmodel: 6,425,856 parameters; each of the 64 ranks holds about 1/64 of them
    assert "6,425,856 parameters, 100,768 on rank 0" in log
    assert "layers.0.attention.wo.weight: global (256, 256), local (32, 32) (Shard(dim=0), Shard(dim=1))" in log


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("--parallelism.data_parallel_shard_degree", "8", "--parallelism.tensor_parallel_degree", "16"),
         "parallelism degrees multiply to 128"),
        (("--parallelism.tensor_parallel_degree", "32"),
         "--parallelism.tensor_parallel_degree=32 must divide the model's n_heads=16"),
    ],
)
def test_fake_backend_invalid_layout(overrides: tuple[str, ...], message: str) -> None:
    run = _dry_run(64, *overrides)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ConfigError: ") and message in lines[0], run.stderr
