"""The trainer end to end through run_train.sh on CPU: losses, parity of equivalent setups, errors."""

import math
import subprocess
import sys

import pytest

from tests.integration_tests.runner import REPO, TINY, run_train

pytestmark = pytest.mark.slow


def _assert_losses_close(a: dict[int, float], b: dict[int, float], rtol: float) -> None:
    assert a.keys() == b.keys() and a, (a, b)
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=rtol), f"step {step}: {a[step]} vs {b[step]}"


def test_default_job_loss_falls(tmp_path):
    """The shipped default job, unchanged, trains and its loss falls by a wide margin."""
    run = run_train(tmp_path, "--metrics.log_freq", "1")
    losses = run.losses()
    steps = sorted(losses)
    assert steps[-1] == 60
    last5 = sum(losses[s] for s in steps[-5:]) / 5
    assert last5 < losses[1] - 2.0, (losses[1], last5)
    record = run.metrics()[-1]
    for key in ("grad_norm", "lr", "tps", "tflops", "memory_gib", "n_tokens_seen", "time_s"):
        assert key in record
    assert record["n_tokens_seen"] == 60 * 8 * 128
    assert record["tps"] > 0


def test_grad_accumulation_matches_large_batch(tmp_path):
    big = run_train(tmp_path / "big", *TINY, "--training.local_batch_size", "8")
    accum = run_train(
        tmp_path / "accum", *TINY, "--training.local_batch_size", "4", "--training.global_batch_size", "8"
    )
    _assert_losses_close(big.losses(), accum.losses(), 1e-5)


@pytest.mark.parametrize(
    "ac", [["--activation_checkpoint.mode", "full"], ["--activation_checkpoint.mode", "selective",
           "--activation_checkpoint.selective_ac_option", "2"],
           ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"]],
    ids=["full", "selective-2", "selective-op"],
)
def test_activation_checkpointing_matches_none(tmp_path, ac):
    ref = run_train(tmp_path / "none", *TINY, "--activation_checkpoint.mode", "none")
    run = run_train(tmp_path / "ac", *TINY, *ac)
    _assert_losses_close(ref.losses(), run.losses(), 1e-5)


def test_compile_matches_eager(tmp_path):
    ref = run_train(tmp_path / "eager", *TINY, "--training.steps", "4")
    run = run_train(tmp_path / "compiled", *TINY, "--training.steps", "4", "--compile.enable")
    _assert_losses_close(ref.losses(), run.losses(), 1e-4)


def test_logged_lr_follows_schedule(tmp_path):
    from torchtitan.components.lr_scheduler import lr_factor, schedule_phases

    base_lr, steps, warmup = 1e-3, 6, 2
    run = run_train(
        tmp_path, *TINY, "--optimizer.lr", str(base_lr), "--lr_scheduler.decay_type", "cosine",
        "--lr_scheduler.min_lr_factor", "0.1", "--lr_scheduler.decay_ratio", "0.5",
    )
    phases = schedule_phases(steps, warmup, 0.5)
    for record in run.metrics():
        expected = base_lr * lr_factor(record["step"] - 1, *phases, "cosine", 0.1)
        assert math.isclose(record["lr"], expected, rel_tol=1e-9), (record["step"], record["lr"], expected)
    lrs = [r["lr"] for r in run.metrics()]
    assert lrs[0] == pytest.approx(base_lr / warmup) and lrs[1] == pytest.approx(base_lr)
    assert lrs[-1] < lrs[2]


def test_nonfinite_loss_stops_with_clear_error(tmp_path):
    run = run_train(tmp_path, *TINY, "--optimizer.lr", "1e30", "--training.steps", "5", check=False)
    assert run.returncode == 1
    lines = run.errors()
    assert len(lines) == 1 and "step" in lines[0] and ("nan" in lines[0] or "inf" in lines[0]), run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    logged = run.metrics()
    assert all(math.isfinite(r["loss"]) for r in logged)


def test_tensorboard_and_wandb_outputs(tmp_path):
    run_train(
        tmp_path, *TINY, "--training.steps", "2", "--metrics.enable_tensorboard", "--metrics.enable_wandb"
    )
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events, list(tmp_path.rglob("*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"loss_metrics/global_avg_loss", "grad_norm", "lr"} <= set(acc.Tags()["scalars"])
    assert list(tmp_path.rglob("offline-run-*")), list(tmp_path.rglob("*"))


def test_bad_key_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torchtitan.train", "--job.config_file",
         "torchtitan/models/llama3/train_configs/debug_model.toml", "--parallelism.tensor_paralel_degree", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "parallelism.tensor_parallel_degree" in err[0], proc.stderr


def test_profiler_traces_written(tmp_path):
    run_train(
        tmp_path, *TINY, "--training.steps", "4", "--profiling.enable_profiling", "--profiling.profile_freq", "2",
        "--profiling.profiler_warmup", "0", "--profiling.profiler_active", "1",
    )
    traces = sorted(p.relative_to(tmp_path / "profile_traces").as_posix() for p in (tmp_path / "profile_traces").rglob("*.json"))
    assert any(t.startswith("iteration_2/") for t in traces) and any(t.startswith("iteration_4/") for t in traces), traces
