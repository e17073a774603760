"""`torchtitan.train` whose checkpoint saves pause between writing their files and committing their folder,
so crash tests can kill a job inside that window: `TRAIN_FILE=tests.integration_tests.slow_commit_train`."""

import sys
import time

from torchtitan import train
from torchtitan.components import checkpoint_storage

PAUSE_S = 3.0
_write_synced = checkpoint_storage._write_synced


def _slow_write_synced(path: str, text: str) -> None:
    """`commit` writes its manifest just before the rename; pause first (a module global, so the async
    mode's background commit pauses too)."""
    time.sleep(PAUSE_S)
    _write_synced(path, text)


if __name__ == "__main__":
    checkpoint_storage._write_synced = _slow_write_synced
    sys.exit(train.main())
