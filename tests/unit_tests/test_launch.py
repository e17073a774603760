"""torchtitan.tools.launch: a user error from any rank reaches the console once, whichever rank is shown."""

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
