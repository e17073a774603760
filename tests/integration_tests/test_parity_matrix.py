"""The parallel stack on CPU through run_train.sh: every layout reproduces the single-process losses from
the same seed checkpoint, bf16 mixed precision tracks fp32, checkpoints resume across layouts, and invalid
layouts fail with one line, in real and fake-backend runs."""

import re
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.integration_tests.runner import (
    TINY,
    Run,
    assert_losses_close,
    assert_one_line_error,
    make_seed_checkpoint,
    run_train,
)

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 8
TOKENS_PER_STEP = GLOBAL_BATCH * 64  # TINY's seq_len
PARITY_STEPS = 8
RTOL = 1e-4
# Every run follows one 20-step LR schedule, so an 8- or 10-step run is a prefix of the 20-step reference.
BASE = [*TINY, "--lr_scheduler.total_steps", "20", "--training.global_batch_size", str(GLOBAL_BATCH)]


class Layout(NamedTuple):
    name: str
    ngpu: int
    overrides: list[str]


def layout(
    name: str, *extra: str, dp_replicate: int = 1, dp_shard: int = 1, tp: int = 1, cp: int = 1, accum: int = 1
) -> Layout:
    """A layout seeing the reference's global batch: local batch = global / (data-parallel degree x
    gradient accumulation steps); CP ranks share sequences, not batches."""
    dp = dp_replicate * dp_shard
    overrides = [
        "--parallelism.data_parallel_replicate_degree", str(dp_replicate),
        "--parallelism.data_parallel_shard_degree", str(dp_shard),
        "--parallelism.tensor_parallel_degree", str(tp),
        "--parallelism.context_parallel_degree", str(cp),
        "--training.local_batch_size", str(GLOBAL_BATCH // (dp * accum)),
        *extra,
    ]
    return Layout(name, dp * tp * cp, overrides)


SINGLE = layout("single")
FSDP4 = layout("fsdp4", dp_shard=4)
FSDP2_TP2 = layout("fsdp2-tp2", dp_shard=2, tp=2)
DDP2 = layout("ddp2", dp_replicate=2)
FSDP2 = layout("fsdp2", dp_shard=2)
CP2 = layout("cp2", cp=2)
LAYOUTS = [
    FSDP2,
    FSDP4,
    layout("fsdp2-reshard-always", "--parallelism.fsdp_reshard_after_forward", "always", dp_shard=2),
    layout("fsdp2-reshard-never", "--parallelism.fsdp_reshard_after_forward", "never", dp_shard=2),
    layout("hsdp2x2", dp_replicate=2, dp_shard=2),
    DDP2,
    layout("ddp4", dp_replicate=4),
    layout("tp2", tp=2),
    layout("tp2-no-loss-parallel", "--parallelism.disable_loss_parallel", tp=2),
    layout("tp2-no-sequence-parallel", "--parallelism.disable_sequence_parallel", tp=2),
    FSDP2_TP2,
    layout("hsdp2x2-tp2", dp_replicate=2, dp_shard=2, tp=2),
    layout("fsdp2-tp2-sac-op", "--activation_checkpoint.mode", "selective",
           "--activation_checkpoint.selective_ac_option", "op", dp_shard=2, tp=2),
    layout("fsdp2-tp2-compile", "--compile.enable", dp_shard=2, tp=2),
    layout("fsdp2-cpu-offload", "--training.enable_cpu_offload", dp_shard=2),
    layout("fsdp2-grad-accum", dp_shard=2, accum=2),
    # CP 2 (plain, and with SAC + compile) is checked by the resume tests
    layout("cp4", cp=4),
    layout("fsdp2-cp2-none-balancer-grad-accum", "--parallelism.context_parallel_load_balancer", "none",
           dp_shard=2, cp=2, accum=2),
    layout("cp2-tp2", cp=2, tp=2),
]


def params(layouts: list[Layout]) -> list:
    return [pytest.param(lay, id=lay.name) for lay in layouts]


def train(dump_folder: Path, lay: Layout, *overrides: str) -> Run:
    return run_train(dump_folder, *BASE, *lay.overrides, *overrides, ngpu=lay.ngpu)


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> str:
    """This module's seed checkpoint (the `step-0` folder)."""
    return str(make_seed_checkpoint(tmp_path_factory.mktemp("seed"), *BASE))


@pytest.fixture(scope="module")
def from_seed(seed) -> list[str]:
    """Overrides that start a run from the seed checkpoint without saving anything."""
    return ["--checkpoint.enable", "--checkpoint.initial_load_path", seed, "--checkpoint.load_only"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, from_seed) -> Run:
    """The single-process 20-step run from the seed."""
    return train(tmp_path_factory.mktemp("single"), SINGLE, *from_seed, "--training.steps", "20")


@pytest.mark.parametrize("lay", params(LAYOUTS))
def test_layout_matches_single_process(tmp_path, from_seed, reference, lay):
    run = train(tmp_path, lay, *from_seed, "--training.steps", str(PARITY_STEPS))
    assert_losses_close(run.losses(), reference.losses(), RTOL, steps=list(range(1, PARITY_STEPS + 1)))
    assert run.metrics()[-1]["n_tokens_seen"] == PARITY_STEPS * TOKENS_PER_STEP


def test_bf16_mixed_precision_tracks_fp32(tmp_path, from_seed, reference):
    """FSDP 2 with bf16 parameters: every loss within 2e-2 (relative) of the fp32 run, and falling."""
    run = train(tmp_path, FSDP2, *from_seed, "--training.steps", str(PARITY_STEPS),
                "--training.mixed_precision_param", "bfloat16")
    assert_losses_close(run.losses(), reference.losses(), 2e-2, steps=list(range(1, PARITY_STEPS + 1)))
    losses = run.losses()
    assert losses[PARITY_STEPS] < losses[1] - 0.1, losses
    assert run.losses() != {s: reference.losses()[s] for s in losses}  # bf16 really was used


@pytest.fixture(scope="module")
def fsdp4_first_half(tmp_path_factory, seed) -> Run:
    """10 steps under FSDP 4 from the seed, saving the full state at step 10."""
    return train(
        tmp_path_factory.mktemp("fsdp4"), FSDP4, "--training.steps", "10", "--checkpoint.enable",
        "--checkpoint.initial_load_path", seed, "--checkpoint.interval", "10", "--checkpoint.no_last_save_model_only",
    )


@pytest.mark.parametrize("lay", params([FSDP2_TP2, DDP2, CP2]))
def test_resume_across_layouts(tmp_path, reference, fsdp4_first_half, lay):
    """Steps 11-20, resumed under another layout (model, optimizer and data position resharded), match the
    uninterrupted single-process run."""
    ref = reference.losses()
    assert_losses_close(fsdp4_first_half.losses(), ref, RTOL, steps=list(range(1, 11)))
    shutil.copytree(fsdp4_first_half.dump_folder / "checkpoint" / "step-10", tmp_path / "checkpoint" / "step-10")
    run = train(tmp_path, lay, "--training.steps", "20", "--checkpoint.enable", "--checkpoint.load_only")
    assert_losses_close(run.losses(), ref, RTOL, steps=list(range(11, 21)))
    assert run.metrics()[0]["n_tokens_seen"] == 11 * TOKENS_PER_STEP


def test_cp_resume_across_layouts(tmp_path, seed, reference):
    """CP 2 with op-level SAC and per-block compile matches one process for 10 steps (each token counted
    once), and its checkpoint resumes under FSDP 2 exactly (FSDP 4 -> plain CP 2 is in
    test_resume_across_layouts). One run for both saves a compiling job's start-up."""
    ref = reference.losses()
    first = train(tmp_path / "cp2", CP2, "--activation_checkpoint.mode", "selective",
                  "--activation_checkpoint.selective_ac_option", "op", "--compile.enable",
                  "--training.steps", "10", "--checkpoint.enable",
                  "--checkpoint.initial_load_path", seed, "--checkpoint.interval", "10",
                  "--checkpoint.no_last_save_model_only")
    assert_losses_close(first.losses(), ref, RTOL, steps=list(range(1, 11)))
    assert first.metrics()[-1]["n_tokens_seen"] == 10 * TOKENS_PER_STEP
    shutil.copytree(first.dump_folder / "checkpoint" / "step-10", tmp_path / "fsdp2" / "checkpoint" / "step-10")
    run = train(tmp_path / "fsdp2", FSDP2, "--training.steps", "20", "--checkpoint.enable", "--checkpoint.load_only")
    assert_losses_close(run.losses(), ref, RTOL, steps=list(range(11, 21)))


def test_fake_backend_dry_run_of_cp(tmp_path):
    """A CP 2 x TP 2 x FSDP 2 dry run prints the CP layout and every CP rank's head and tail chunks."""
    run = run_train(tmp_path, "--parallelism.tensor_parallel_degree", "2", "--parallelism.context_parallel_degree",
                    "2", "--training.seq_len", "64", ngpu=8, env={"COMM_MODE": "fake_backend"})
    output = run.stdout + run.stderr
    assert "cp=2" in output and "load balancer headtail, attention allgather_kv" in output, output[-3000:]
    assert "cp rank 0: tokens [0, 16) + [48, 64) of 64" in output, output[-3000:]
    assert "cp rank 1: tokens [16, 32) + [32, 48) of 64" in output, output[-3000:]


def test_fake_backend_dry_run_of_64_ranks(tmp_path):
    """One process checks a 64-rank FSDP 8 x TP 8 layout: prints it, with rank 0 holding about 1/64 of
    the parameters (norms are only FSDP-sharded), and trains nothing."""
    run = run_train(tmp_path, "--parallelism.tensor_parallel_degree", "8", ngpu=64,
                    env={"COMM_MODE": "fake_backend"})
    output = run.stdout + run.stderr
    assert "world_size=64" in output and "dp_shard=8" in output and "tp=8" in output, output[-3000:]
    counts = re.search(r"([\d,]+) parameters, ([\d,]+) on rank 0", output)
    assert counts, output[-3000:]
    total, local = (int(c.replace(",", "")) for c in counts.groups())
    assert total / 64 <= local < total / 32, (total, local)
    assert not (tmp_path / "metrics.jsonl").exists()


# (id, ngpu, overrides, text the error line must contain)
INVALID_LAYOUTS = [
    ("product-not-world-size", 4, ["--parallelism.data_parallel_shard_degree", "2"], "data_parallel_shard_degree=2"),
    ("world-not-divisible", 4, ["--parallelism.tensor_parallel_degree", "3"], "tensor_parallel_degree=3"),
    ("zero-degree", 2, ["--parallelism.tensor_parallel_degree", "0"], "tensor_parallel_degree"),
    ("tp-does-not-divide-heads", 3, ["--parallelism.tensor_parallel_degree", "3"], "n_heads=16"),
    ("seq-len-not-divisible-by-sp", 2, ["--parallelism.tensor_parallel_degree", "2", "--training.seq_len", "63"],
     "training.seq_len=63"),
    ("global-batch-not-multiple", 2, ["--parallelism.data_parallel_shard_degree", "2",
                                      "--training.global_batch_size", "12"], "global_batch_size = 12 is invalid"),
    ("ddp-with-tp", 4, ["--parallelism.data_parallel_replicate_degree", "2",
                        "--parallelism.data_parallel_shard_degree", "1", "--parallelism.tensor_parallel_degree", "2"],
     "data_parallel_replicate_degree=2"),
    ("cpu-offload-without-fsdp", 2, ["--parallelism.data_parallel_replicate_degree", "2",
                                     "--parallelism.data_parallel_shard_degree", "1",
                                     "--training.enable_cpu_offload"], "enable_cpu_offload"),
    ("async-tp-without-cuda-and-compile", 2, ["--parallelism.tensor_parallel_degree", "2",
                                              "--parallelism.enable_async_tensor_parallel"],
     "enable_async_tensor_parallel"),
]


@pytest.mark.parametrize("comm_mode", ["real", "fake_backend"])
@pytest.mark.parametrize(
    "ngpu, overrides, expected", [pytest.param(n, o, e, id=name) for name, n, o, e in INVALID_LAYOUTS]
)
def test_invalid_layout_is_one_line_error(tmp_path, comm_mode, ngpu, overrides, expected):
    assert_one_line_error(tmp_path, *TINY, *overrides, expected=expected, ngpu=ngpu, comm_mode=comm_mode)


# CP's own checks, in dry runs only (one process each; the real runs raise the same errors from the same code).
INVALID_CP_LAYOUTS = [
    ("seq-len-not-divisible-by-2cp-tp", ["--parallelism.tensor_parallel_degree", "2", "--training.seq_len", "68"],
     "--training.seq_len=68 must be divisible by 8"),
    ("torch-ring-on-cpu", ["--parallelism.context_parallel_attention", "torch_ring"],
     "context_parallel_attention=torch_ring needs CUDA"),
    ("alltoall-without-torch-ring", ["--parallelism.context_parallel_rotate_method", "alltoall"],
     "context_parallel_rotate_method=alltoall applies only to torch_ring"),
]


@pytest.mark.parametrize("overrides, expected", [pytest.param(o, e, id=name) for name, o, e in INVALID_CP_LAYOUTS])
def test_invalid_cp_layout_is_one_line_error(tmp_path, overrides, expected):
    assert_one_line_error(tmp_path, *TINY, "--parallelism.context_parallel_degree", "2", *overrides, expected=expected,
                          ngpu=4, comm_mode="fake_backend")
