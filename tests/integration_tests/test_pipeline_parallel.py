"""Pipeline parallelism on CPU through run_train.sh: every torch schedule, a CSV schedule and PP combined with
FSDP, TP and DDP reproduce the single-process losses from one seed checkpoint; PP checkpoints resume under
other layouts and schedules; invalid PP settings fail with one line, in real and fake-backend runs."""

import shutil
from pathlib import Path

import pytest

from tests.integration_tests.runner import (
    REPO,
    TINY,
    Run,
    assert_losses_close,
    assert_one_line_error,
    make_seed_checkpoint,
    run_train,
)

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 8
STEPS = 8
HALF = STEPS // 2
RTOL = 1e-4
BASE = [*TINY, "--training.steps", str(STEPS), "--lr_scheduler.total_steps", str(STEPS), "--training.global_batch_size", str(GLOBAL_BATCH),
        "--training.local_batch_size", str(GLOBAL_BATCH)]
CSV = REPO / "torchtitan/models/llama3/train_configs/pp2_1f1b_4mb.csv"
SCHEDULES = ["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]


def pp(schedule: str, *extra: str) -> list[str]:
    return ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_schedule", schedule, *extra]


@pytest.fixture(scope="module")
def from_seed(tmp_path_factory) -> list[str]:
    seed = make_seed_checkpoint(tmp_path_factory.mktemp("seed"), *BASE)
    return ["--checkpoint.enable", "--checkpoint.initial_load_path", str(seed)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, from_seed) -> Run:
    """The single-process run from the seed (the same global batch)."""
    return run_train(tmp_path_factory.mktemp("single"), *BASE, *from_seed, "--checkpoint.load_only")


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[int, float]:
    return reference_run.losses()


@pytest.fixture(scope="module")
def pp_1f1b(tmp_path_factory, from_seed) -> Run:
    """PP 2 with 1F1B from the seed, saving the full state at step HALF."""
    return run_train(tmp_path_factory.mktemp("pp1f1b"), *BASE, *from_seed, *pp("1F1B"),
                     "--checkpoint.interval", str(HALF), "--checkpoint.no_last_save_model_only", ngpu=2)


def test_every_schedule_and_csv_matches_single_process(tmp_path, from_seed, reference, reference_run, pp_1f1b):
    """Each schedule (2 stages per rank for the multi-stage ones, 8 microbatches) and a CSV action table
    (4 microbatches of 2) give every step's loss within 1e-4 of one process; the log shows the real loss,
    and the gradient norm (clipping is active: max_norm 1) is reduced over the stages."""
    assert_losses_close(pp_1f1b.losses(), reference, RTOL)
    norms = [{r["step"]: r["grad_norm"] for r in run.metrics()} for run in (pp_1f1b, reference_run)]
    assert_losses_close(*norms, RTOL)
    assert max(norms[1].values()) > 1.0
    cases = {name: pp(name) for name in SCHEDULES if name != "1F1B"}
    cases["csv"] = pp("PipelineScheduleSingle", "--parallelism.pipeline_parallel_schedule_csv", str(CSV),
                      "--parallelism.pipeline_parallel_microbatch_size", "2")
    for name, overrides in cases.items():
        run = run_train(tmp_path / name, *BASE, *from_seed, "--checkpoint.load_only", *overrides, ngpu=2)
        assert_losses_close(run.losses(), reference, RTOL)
        assert "pp rank 0 (" in run.stderr  # the stage line was logged


def test_pp_with_data_and_tensor_parallel(tmp_path, from_seed, reference):
    """PP 2 x FSDP 2, PP 2 x TP 2 (Interleaved1F1B), PP 2 x DDP 2, PP 2 x CP 2, and PP 2 with gradient accumulation,
    selective AC and compile (1F1B) all match one process."""
    half = ["--training.local_batch_size", str(GLOBAL_BATCH // 2)]
    cases = {
        "pp2-fsdp2": (4, [*pp("1F1B"), "--parallelism.data_parallel_shard_degree", "2", *half]),
        "pp2-tp2": (4, [*pp("Interleaved1F1B"), "--parallelism.tensor_parallel_degree", "2",
                        "--parallelism.data_parallel_shard_degree", "1"]),
        "pp2-ddp2": (4, [*pp("GPipe"), "--parallelism.data_parallel_replicate_degree", "2",
                         "--parallelism.data_parallel_shard_degree", "1", *half]),
        "pp2-cp2": (4, [*pp("1F1B"), "--parallelism.context_parallel_degree", "2",
                        "--parallelism.data_parallel_shard_degree", "1"]),
        "pp2-accum-sac-compile": (2, [*pp("1F1B"), *half, "--activation_checkpoint.mode", "selective",
                                      "--activation_checkpoint.selective_ac_option", "2", "--compile.enable"]),
    }
    for name, (ngpu, overrides) in cases.items():
        run = run_train(tmp_path / name, *BASE, *from_seed, "--checkpoint.load_only", *overrides, ngpu=ngpu)
        assert_losses_close(run.losses(), reference, RTOL)


def _resume(tmp_path: Path, first_half: Run, ngpu: int, *overrides: str) -> Run:
    shutil.copytree(first_half.dump_folder / "checkpoint" / f"step-{HALF}", tmp_path / "checkpoint" / f"step-{HALF}")
    return run_train(tmp_path, *BASE, "--checkpoint.enable", "--checkpoint.load_only", *overrides, ngpu=ngpu)


def test_resume_across_layouts(tmp_path, from_seed, reference, pp_1f1b):
    """A PP 2 (1F1B) checkpoint resumes under FSDP 2 and under PP 2 Interleaved1F1B, and an FSDP 2
    checkpoint under PP 2: steps HALF+1.. match the uninterrupted run (model, optimizer, data position)."""
    fsdp2 = ["--parallelism.data_parallel_shard_degree", "2", "--training.local_batch_size", str(GLOBAL_BATCH // 2)]
    second_half = list(range(HALF + 1, STEPS + 1))
    for name, ngpu, overrides in [("to-fsdp2", 2, fsdp2), ("to-interleaved", 2, pp("Interleaved1F1B"))]:
        run = _resume(tmp_path / name, pp_1f1b, ngpu, *overrides)
        assert_losses_close(run.losses(), reference, RTOL, steps=second_half)
    fsdp_first = run_train(tmp_path / "fsdp2", *BASE, *from_seed, *fsdp2, "--training.steps", str(HALF),
                           "--checkpoint.interval", str(HALF), "--checkpoint.no_last_save_model_only", ngpu=2)
    run = _resume(tmp_path / "fsdp2-to-pp2", fsdp_first, 2, *pp("ZBVZeroBubble"))
    assert_losses_close(run.losses(), reference, RTOL, steps=second_half)


# (id, ngpu, overrides, text the error line must contain)
INVALID = [
    ("unknown-schedule", 2, pp("Zigzag"), "Interleaved1F1B, LoopedBFS"),
    ("microbatch-not-dividing", 2, pp("1F1B", "--parallelism.pipeline_parallel_microbatch_size", "3"),
     "pipeline_parallel_microbatch_size=3"),
    ("stages-not-dividing", 2, pp("Interleaved1F1B", "--parallelism.pipeline_parallel_layers_per_stage", "3"),
     "pipeline_parallel_layers_per_stage=3"),
    ("too-few-microbatches", 2, pp("ZBVZeroBubble", "--parallelism.pipeline_parallel_microbatch_size", "4"),
     "at least 4 microbatches"),
]


@pytest.mark.parametrize("comm_mode", ["real", "fake_backend"])
@pytest.mark.parametrize("ngpu, overrides, expected", [pytest.param(n, o, e, id=i) for i, n, o, e in INVALID])
def test_invalid_pipeline_setting_is_one_line_error(tmp_path, comm_mode, ngpu, overrides, expected):
    assert_one_line_error(tmp_path, *TINY, *overrides, expected=expected, ngpu=ngpu, comm_mode=comm_mode)


def test_fake_backend_prints_every_pp_rank(tmp_path):
    """The 405B dry run on FSDP 8 x TP 8 x PP 8 (512 ranks) prints each PP rank's stages and schedule."""
    run = run_train(tmp_path, "--model.flavor", "405B", "--parallelism.tensor_parallel_degree", "8",
                    *pp("Interleaved1F1B")[2:], "--parallelism.pipeline_parallel_degree", "8",
                    "--training.local_batch_size", "16", "--training.seq_len", "64", ngpu=512,
                    env={"COMM_MODE": "fake_backend"})
    output = run.stdout + run.stderr
    for rank in range(8):
        assert f"pp rank {rank} (ScheduleInterleaved1F1B" in output, output[-3000:]
    assert "stage 0: tok_embeddings, layers.0-" in output and "norm, output" in output, output[-3000:]
