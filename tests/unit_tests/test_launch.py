"""torchtitan.tools.launch: a user error from any rank reaches the console once, whichever rank is shown;
and how a rank of a launched job exits (torchtitan.distributed.utils.exit_process)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

WORKER = """
import os, sys, time
from torchtitan.tools.launch import report_error
if os.environ["RANK"] == "{failing}":
    report_error("bad value for --x.y; fix: use 1")
    sys.exit(2)
time.sleep(60)  # the other rank would train on; the launcher must stop it
"""


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_error_of_any_rank_printed_once(tmp_path: Path, failing_rank: int):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(failing=failing_rank)))
    run = subprocess.run(
        [sys.executable, "-m", "torchtitan.tools.launch", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
         "--rdzv_endpoint", "localhost:0", "--local-ranks-filter", "0", "--tee", "3", str(script)],
        capture_output=True, text=True, timeout=50,
    )
    errors = [line for line in (run.stdout + run.stderr).splitlines() if "error: " in line and "--x.y" in line]
    assert run.returncode == 2, run.stderr[-2000:]
    assert errors == ["error: bad value for --x.y; fix: use 1"], run.stderr[-2000:]
    assert f"failed on rank {failing_rank} with exit code 2" in run.stderr


def test_error_printed_without_launcher(capsys, monkeypatch):
    from torchtitan.tools.launch import REPORT_TO_LAUNCHER_ENV, report_error

    monkeypatch.delenv(REPORT_TO_LAUNCHER_ENV, raising=False)
    report_error("bad value")
    assert capsys.readouterr().err == "error: bad value\n"


EXITING_RANK = """
import atexit
from torchtitan.distributed.utils import exit_process
class Teardown:
    def __del__(self):  # runs in the interpreter's teardown, which a multi-process rank skips
        print(" teardown ran", flush=True)
keep = Teardown()
atexit.register(lambda: print(" exit handler ran", flush=True))
print("unflushed output", end="")
exit_process(3)
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_rank_exit_skips_teardown_but_keeps_code_output_and_exit_handlers(world_size: str):
    """A rank of a multi-process job leaves through os._exit, skipping the interpreter's teardown and C++
    static destructors (where torch 2.13's gloo teardown sometimes aborts), yet its exit code, buffered
    output and atexit handlers survive; a single process tears down as usual."""
    run = subprocess.run(
        [sys.executable, "-c", EXITING_RANK], capture_output=True, text=True, timeout=120,
        env={**os.environ, "WORLD_SIZE": world_size},
    )
    assert run.returncode == 3, run.stderr[-2000:]
    assert run.stdout == "unflushed output exit handler ran\n" + (" teardown ran\n" if world_size == "1" else "")
