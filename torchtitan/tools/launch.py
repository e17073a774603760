"""torchrun, reporting a failed job in one line (and its exit code) instead of torchrun's traceback.

`python -m torchtitan.tools.launch [torchrun args]`; used by run_train.sh. Under this launcher a rank that
stops on a user error (`report_error`) does not print it: it writes it to its torchelastic error file, and
the launcher prints the first failure's message once. Printing from the ranks instead would lose the error
whenever a rank hidden by `--local-ranks-filter` failed first and torchrun stopped the shown rank before it
had printed (and would print it twice when both got there).
"""

import json
import os
import sys
import tempfile
import time

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import main as torchrun

# Set by this launcher for its workers: they report user errors through their error files.
REPORT_TO_LAUNCHER_ENV = "TORCHTITAN_REPORT_ERRORS_TO_LAUNCHER"


def report_error(message: str) -> None:
    """Report a user error (bad config, diverged run) in one `error: ...` line: printed to stderr, or, in a
    worker of this launcher, handed to the launcher to print."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if os.environ.get(REPORT_TO_LAUNCHER_ENV) and error_file:
        # torchelastic's error-file format, so its agent reads the timestamp and copies the file as usual.
        with open(error_file, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
    else:
        print(f"error: {message}", file=sys.stderr)


def _reported_message(failure: ProcessFailure) -> str | None:
    message = failure.error_file_data.get("message")
    return message.get("message") if isinstance(message, dict) else None


def main(argv: list[str]) -> int:
    os.environ[REPORT_TO_LAUNCHER_ENV] = "1"
    with tempfile.TemporaryDirectory() as folder:
        # The agent copies the first failure's error file here (without one it logs that it has nowhere to).
        os.environ["TORCHELASTIC_ERROR_FILE"] = os.path.join(folder, "error.json")
        try:
            torchrun(argv)
        except ChildFailedError as e:
            # A reported error wins over the signals torchrun then sent the other ranks, even within one second.
            reported = {r: f for r, f in e.failures.items() if _reported_message(f) is not None}
            rank = min(reported or e.failures, key=lambda r: e.failures[r].timestamp)
            failure = e.failures[rank]
            if reported:
                print(f"error: {_reported_message(failure)}", file=sys.stderr)
            print(f"torchrun: {e.name} failed on rank {rank} with exit code {failure.exitcode}", file=sys.stderr)
            return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
