"""End a rank when the launcher that started it dies.

torchrun starts each worker in a session of its own, so when its agent is SIGKILLed (it cannot forward
that signal) the ranks would train on, orphaned, writing checkpoints into a folder that a restarted job
may already be using.
"""

import ctypes
import os
import signal
import sys
import threading
import time

from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

# Set by torchrun's agent in every worker's environment; its agent is then the worker's parent process.
LAUNCHER_ENV = "TORCHELASTIC_RUN_ID"
_PR_SET_PDEATHSIG = 1


def exit_with_launcher(poll_s: float = 1.0) -> None:
    """Under torchrun, make this process exit as soon as its parent (the launcher) dies; else do nothing.

    On Linux the kernel SIGKILLs it (`PR_SET_PDEATHSIG`); elsewhere a daemon thread checks the parent
    every `poll_s` seconds. Call it once, early, from the main thread.
    """
    if LAUNCHER_ENV not in os.environ:
        return
    parent = os.getppid()
    if _set_parent_death_signal():
        # A parent that died before the prctl call sends no signal; this process was then re-parented.
        if os.getppid() != parent:
            _exit_orphaned(parent)
        return
    threading.Thread(target=_watch, args=(parent, poll_s), name="parent_watch", daemon=True).start()


def _set_parent_death_signal() -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits; False where prctl is unavailable.

    The signal fires when the parent *thread* that forked this process exits: torchrun's agent starts its
    workers from its main thread (`LocalElasticAgent._start_workers` -> `SubprocessHandler`'s `Popen`).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0


def _watch(parent: int, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    _exit_orphaned(parent)


def _exit_orphaned(parent: int) -> None:
    logger.error(f"The launcher (pid {parent}) died: exiting")
    os._exit(1)
