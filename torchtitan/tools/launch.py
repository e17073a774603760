"""torchrun, reporting a failed rank in one line (and its exit code) instead of torchrun's traceback.

`python -m torchtitan.tools.launch [torchrun args]`; used by run_train.sh. The failing rank has
already printed its own error; torchrun's ChildFailedError traceback would only bury it.
"""

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun


def main(argv: list[str]) -> int:
    try:
        torchrun(argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"torchrun: {e.name} failed on rank {rank} with exit code {failure.exitcode}", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
