"""SIGKILL of run_train.sh's launcher alone (torchrun's agent, whose workers run in sessions of their own):
the ranks exit with it, the checkpoint folder stays as it was, and a restart resumes exactly."""

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from torchtitan.components.checkpoint_storage import is_complete
from tests.integration_tests.runner import (
    assert_losses_close,
    descendants,
    logged_steps,
    losses_after,
    run_train,
    start_train,
    step_folders,
    wait_until,
)
from tests.integration_tests.test_checkpoint_resume import BASE, CKPT, REF

pytestmark = pytest.mark.slow

JOB = [*BASE, *CKPT, "--checkpoint.interval", "2", *REF]
NGPU = 2
# How long the ranks have to exit, and the checkpoint folder to stay untouched, after the kill.
GRACE_S = 10


def running_since(pid: int) -> int | None:
    """The start time of process `pid` while it runs (it tells a reused pid apart); None once it exited,
    reaped or not (the killed ranks' new parent may never reap them)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder` with its size and mtime."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_ranks_exit_with_their_launcher_and_the_restart_resumes(tmp_path):
    ref = run_train(tmp_path / "ref", *BASE, *REF, ngpu=NGPU).losses()
    folder, ckpt = tmp_path / "job", tmp_path / "job" / "checkpoint"
    launcher = start_train(folder, *JOB, ngpu=NGPU)
    ranks: dict[int, int | None] = {}

    def survivors() -> list[int]:
        return [pid for pid, start in ranks.items() if start is not None and running_since(pid) == start]

    try:
        wait_until(launcher, lambda: bool(step_folders(ckpt)))
        ranks = {pid: running_since(pid) for pid in descendants(launcher.pid)}
        assert len(ranks) >= NGPU, ranks
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        before = snapshot(ckpt)
        time.sleep(GRACE_S)
        assert survivors() == []
        assert snapshot(ckpt) == before
    finally:
        for pid in survivors():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    complete = step_folders(ckpt)
    assert complete and all(is_complete(str(ckpt / f"step-{step}")) for step in complete), complete

    n = len(logged_steps(folder))
    resumed = run_train(folder, *JOB, ngpu=NGPU)
    assert_losses_close(losses_after(resumed, n), ref, 0, steps=list(range(complete[-1] + 1, 21)))
    assert not list(ckpt.glob("*.tmp"))
