"""tools/parent_watch.py: a rank started by a launcher exits when the launcher is SIGKILLed."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchtitan.tools.parent_watch import LAUNCHER_ENV

REPO = str(Path(__file__).resolve().parents[2])

# What a rank may run before exit_with_launcher: the fallback without prctl, or its launcher dying
# before the prctl call.
NO_PRCTL = "parent_watch._set_parent_death_signal = lambda: False"
PARENT_DIES_FIRST = """
set_signal = parent_watch._set_parent_death_signal
def parent_dies_first():
    parent = os.getppid()
    os.kill(parent, signal.SIGKILL)
    while os.getppid() == parent:
        time.sleep(0.01)
    return set_signal()
parent_watch._set_parent_death_signal = parent_dies_first
"""
LOGGED = "The launcher (pid"


def running(pid: int) -> bool:
    """True while `pid` runs (an exited process its new parent has not reaped yet is a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def launch(stderr: Path, setup: str, under_torchrun: bool) -> tuple[subprocess.Popen, int]:
    """Start a launcher whose child, the rank (in a session of its own, like torchrun's workers), runs
    `setup` and `exit_with_launcher`, then sleeps. Returns the launcher and the rank's pid once the rank is
    past the call or dead."""
    rank = "\n".join([
        "import os, signal, sys, time",
        f"sys.path.insert(0, {REPO!r})",
        "from torchtitan.tools import parent_watch",
        "from torchtitan.tools.logging import init_logger",
        "init_logger()",
        setup,
        "parent_watch.exit_with_launcher(poll_s=0.1)",
        "print('ready', flush=True)",
        "time.sleep(60)",
    ])
    launcher = "\n".join([
        "import subprocess, sys, time",
        f"rank = subprocess.Popen([sys.executable, '-c', {rank!r}], start_new_session=True, "
        f"stderr=open({str(stderr)!r}, 'w'))",
        "print(rank.pid, flush=True)",
        "time.sleep(60)",
    ])
    env = {k: v for k, v in os.environ.items() if k != LAUNCHER_ENV}
    if under_torchrun:
        env[LAUNCHER_ENV] = "test"
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True, env=env)
    pid = int(proc.stdout.readline())
    proc.stdout.readline()  # "ready", or "" once the rank has exited
    return proc, pid


def kill_launcher_then_wait(proc: subprocess.Popen, rank: int, timeout: float) -> bool:
    """SIGKILL the launcher; True when the rank stops running within `timeout` seconds."""
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + timeout
    while running(rank) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not running(rank)


@pytest.mark.parametrize(
    "setup, logs",
    [
        pytest.param("", False, id="prctl"),
        pytest.param(NO_PRCTL, True, id="polling-thread"),
        pytest.param(PARENT_DIES_FIRST, True, id="launcher-died-before-prctl"),
    ],
)
def test_rank_exits_when_its_launcher_is_killed(tmp_path, setup, logs):
    proc, rank = launch(tmp_path / "rank.err", setup, under_torchrun=True)
    try:
        assert kill_launcher_then_wait(proc, rank, timeout=5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank, signal.SIGKILL)
    assert (LOGGED in (tmp_path / "rank.err").read_text()) == logs


def test_process_without_launcher_is_left_alone(tmp_path):
    """A plain run (no torchrun) outlives the process that started it."""
    proc, rank = launch(tmp_path / "rank.err", "", under_torchrun=False)
    try:
        assert not kill_launcher_then_wait(proc, rank, timeout=2)
    finally:
        os.kill(rank, signal.SIGKILL)
