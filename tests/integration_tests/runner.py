"""Run jobs through `run_train.sh` as a user would, and read back what they wrote."""

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

REPO = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = REPO / "torchtitan/models/llama3/train_configs/debug_model.toml"

# A tiny, fast, exact (fp32) job shared by the integration tests; each test adds its overrides.
TINY = [
    "--training.seq_len", "64",
    "--training.local_batch_size", "4",
    "--training.steps", "6",
    "--training.mixed_precision_param", "float32",
    "--lr_scheduler.warmup_steps", "2",
    "--metrics.log_freq", "1",
    "--debug.seed", "42",
    "--debug.deterministic",
]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    dump_folder: Path

    def metrics(self, split: str | None = None) -> list[dict]:
        """The metrics.jsonl records of this run (training records unless `split` is given)."""
        path = self.dump_folder / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in records if r.get("split") == split]

    def errors(self) -> list[str]:
        """The `error: ...` lines the ranks printed (torchrun's `[rankN]:` prefixes removed)."""
        lines = (re.sub(r"^(\[rank\d+\]:)+", "", line) for line in self.stderr.splitlines())
        return [line for line in lines if line.startswith("error:")]

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.metrics()}


def _launch(
    dump_folder: Path, overrides: tuple[str, ...], ngpu: int, config: Path, env: dict[str, str] | None
) -> tuple[list[str], dict[str, str]]:
    """The run_train.sh command line and environment of a job."""
    full_env = {
        **os.environ,
        "NGPU": str(ngpu),
        "CONFIG_FILE": str(config),
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        **(env or {}),
    }
    return ["./run_train.sh", "--job.dump_folder", str(dump_folder), *overrides], full_env


def run_train(
    dump_folder: Path,
    *overrides: str,
    ngpu: int = 1,
    config: Path = DEBUG_CONFIG,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: int = 600,
) -> Run:
    """Launch `./run_train.sh` with NGPU CPU processes; fail the test with the log if it fails."""
    cmd, full_env = _launch(dump_folder, overrides, ngpu, config, env)
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    run = Run(proc.returncode, proc.stdout, proc.stderr, Path(dump_folder))
    if check and proc.returncode != 0:
        raise AssertionError(
            f"run_train.sh {' '.join(overrides)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return run


def start_train(
    dump_folder: Path, *overrides: str, ngpu: int = 1, config: Path = DEBUG_CONFIG, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `./run_train.sh` in the background (stop it with `kill_job`)."""
    cmd, full_env = _launch(dump_folder, overrides, ngpu, config, env)
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def descendants(pid: int) -> list[int]:
    """The pids of every process below `pid` (children first)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            children.append(int(stat.parent.name))
    return children + [d for child in children for d in descendants(child)]


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a job from `start_train` like a preemption: the launcher and every worker (torchrun starts
    each worker in a session of its own, so killing the launcher's process group would miss them)."""
    for pid in [*descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def wait_until(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 300) -> None:
    """Return as soon as `condition()` holds; fail if the job ends or `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the job ended (exit code {proc.returncode}) before the kill point"
        assert time.monotonic() < deadline, "the job never reached the kill point"
        time.sleep(0.05)


def kill_when(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 300) -> None:
    """SIGKILL the whole job as soon as `condition()` holds; fail if the job ends first."""
    try:
        wait_until(proc, condition, timeout)
    finally:
        kill_job(proc)


def logged_steps(dump_folder: Path) -> list[int]:
    """Steps in metrics.jsonl so far (complete lines only: the job may be writing)."""
    path = dump_folder / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line)["step"] for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def losses_after(run: Run, n_records: int) -> dict[int, float]:
    """The losses this run's dump folder logged after its first `n_records` records (a restarted run)."""
    return {r["step"]: r["loss"] for r in run.metrics()[n_records:]}


def run_module(dump_folder: Path, *overrides: str, config: Path = DEBUG_CONFIG, timeout: int = 300) -> Run:
    """Run `python -m torchtitan.train` as one process without torchrun (its exit code and stderr unchanged)."""
    _, env = _launch(dump_folder, overrides, 1, config, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torchtitan.train", "--job.config_file", str(config),
         "--job.dump_folder", str(dump_folder), *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, Path(dump_folder))


_ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:)*(error: .*)$")


def error_lines(run: Run) -> list[str]:
    """The `error: ...` lines the job printed (torchrun's `[rankN]:` prefixes removed)."""
    lines = (run.stdout + "\n" + run.stderr).splitlines()
    return [m.group(1) for line in lines if (m := _ERROR_LINE.match(line))]


def assert_one_line_error(
    dump_folder: Path, *overrides: str, expected: str, ngpu: int, comm_mode: str = "real"
) -> None:
    """Run a job that must fail on its config: exit code 2, exactly one `error:` line containing `expected`,
    no traceback and no training record; `comm_mode="fake_backend"` checks the dry run instead."""
    env = {"COMM_MODE": comm_mode} if comm_mode == "fake_backend" else None
    run = run_train(dump_folder, *overrides, ngpu=ngpu, env=env, check=False)
    lines = error_lines(run)
    assert run.returncode == 2 and len(lines) == 1, (run.returncode, (run.stdout + run.stderr)[-3000:])
    assert expected in lines[0], lines[0]
    assert "Traceback" not in run.stdout + run.stderr
    assert not (Path(dump_folder) / "metrics.jsonl").exists()


def make_seed_checkpoint(dump_folder: Path, *overrides: str) -> Path:
    """Create a seed checkpoint (one process, all degrees 1) and return its `step-0` folder."""
    run_train(
        dump_folder, *overrides, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint",
        "--training.steps", "1", "--parallelism.data_parallel_shard_degree", "1",
        "--parallelism.data_parallel_replicate_degree", "1", "--parallelism.tensor_parallel_degree", "1",
    )
    return Path(dump_folder) / "checkpoint" / "step-0"


def assert_losses_close(
    actual: dict[int, float], expected: dict[int, float], rtol: float, steps: list[int] | None = None,
    atol: float = 0.0,
) -> None:
    """`actual` logged exactly `steps` (default: the steps of `expected`), each within `rtol` (relative) or
    `atol` (absolute) of `expected` (both 0: bitwise equal)."""
    steps = sorted(expected) if steps is None else steps
    assert sorted(actual) == steps, (sorted(actual), steps)
    bad = {
        s: (actual[s], expected[s])
        for s in steps
        if not math.isclose(actual[s], expected[s], rel_tol=rtol, abs_tol=atol)
    }
    assert not bad, f"losses differ beyond rtol={rtol}, atol={atol} (step: (actual, expected)): {bad}"


def step_folders(checkpoint_folder: Path) -> list[int]:
    """The steps N that have a `step-N` folder (complete ones: temporary folders carry a suffix)."""
    names = [p.name.removeprefix("step-") for p in Path(checkpoint_folder).glob("step-*") if p.is_dir()]
    return sorted(int(n) for n in names if n.isdigit())


def _dcp_metadata(step_folder: Path) -> dict:
    return dcp.FileSystemReader(str(step_folder)).read_metadata().state_dict_metadata


def dcp_dtypes(step_folder: Path) -> dict[str, torch.dtype | None]:
    """Each key of a DCP checkpoint with its tensor dtype (None for non-tensor entries), from `.metadata`."""
    return {
        key: md.properties.dtype if isinstance(md, TensorStorageMetadata) else None
        for key, md in _dcp_metadata(step_folder).items()
    }


def load_dcp_tensors(step_folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, read on one process."""
    state = {
        key: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in _dcp_metadata(step_folder).items()
        if isinstance(md, TensorStorageMetadata)
    }
    dcp.load(state, checkpoint_id=str(step_folder), no_dist=True)
    return state
