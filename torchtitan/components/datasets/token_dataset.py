"""The window stream read from pretokenized token files: window k is read directly, at O(1) cost.

Unshuffled, window k is tokens [k*(seq_len+1), (k+1)*(seq_len+1)) of the token stream repeated forever,
exactly the window the streaming path (`packing`) cuts from the same documents, across pass boundaries
too. With a shuffle seed, each pass takes the stream's P = num_tokens // (seq_len+1) whole windows
(the last num_tokens mod (seq_len+1) tokens are left out) in a seeded order: window k is window
`shuffled_index(k mod P, P, seed, k // P)` of the stream. Either way window k depends only on k, so the
`[kG, (k+1)G)` order of global batches, and the state (the window index), are layout-independent.
"""

from collections.abc import Iterator
from itertools import count
from typing import Any

import numpy as np
import torch

from torchtitan.components.datasets.packing import Batch, StreamPosition, WindowDataset, loader_worker
from torchtitan.components.datasets.token_files import TokenFiles
from torchtitan.components.datasets.window_order import shuffled_index
from torchtitan.config import ConfigError


class TokenFileDataset(WindowDataset):
    """One data-parallel rank's batches of the windows of a token folder; each rank reads only its own."""

    format = "tokens"

    def __init__(
        self,
        tokens: TokenFiles,
        name: str,
        seq_len: int,
        local_batch_size: int,
        dp_world_size: int = 1,
        dp_rank: int = 0,
        infinite: bool = True,
        shuffle_seed: int | None = None,
        pad_last: bool = False,
    ):
        super().__init__(name, seq_len, local_batch_size, dp_world_size, dp_rank, infinite, pad_last)
        self.tokens = tokens
        self.shuffle_seed = shuffle_seed
        self.windows_per_pass = tokens.num_tokens // (seq_len + 1)
        if self.windows_per_pass == 0 and shuffle_seed is not None:
            raise ConfigError(
                f"training.shuffle_seed: dataset {name!r} holds {tokens.num_tokens} tokens, less than one window "
                f"of seq_len + 1 = {seq_len + 1}, so there is nothing to shuffle; unset it or use a smaller seq_len"
            )

    def window_start(self, window: int) -> int:
        """The offset in the token stream of global window `window`."""
        if self.shuffle_seed is None:
            return window * (self.seq_len + 1)
        epoch, index = divmod(window, self.windows_per_pass)
        return shuffled_index(index, self.windows_per_pass, self.shuffle_seed, epoch) * (self.seq_len + 1)

    def position_after(self, window: int) -> StreamPosition:
        """The state after `window` windows; `epoch` is the pass the next window starts in."""
        if self.shuffle_seed is None:
            return StreamPosition(window, epoch=window * (self.seq_len + 1) // self.tokens.num_tokens)
        return StreamPosition(window, epoch=window // self.windows_per_pass)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Start at the saved window (a state saved by the streaming path names the same window)."""
        self._start = self._position = self.position_after(state_dict["window"])

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = loader_worker()
        per_rank, n = self.local_batch_size, self.seq_len + 1
        chunk_len = per_rank * self.dp_world_size
        start = self._start.window
        for chunk in count(worker, num_workers):
            end = start + (chunk + 1) * chunk_len
            first = end - chunk_len + self.dp_rank * per_rank
            count_rows = per_rank
            if not self.infinite and end > self.windows_per_pass:
                if not self.pad_last or end - chunk_len >= self.windows_per_pass:
                    return
                count_rows = min(per_rank, max(0, self.windows_per_pass - first))
                end = self.windows_per_pass
            rows = np.empty((count_rows, n), dtype=np.int64)
            for i in range(count_rows):
                self.tokens.read_into(rows[i], self.window_start(first + i))
            self._position = self.position_after(end)
            yield self.batch(torch.from_numpy(rows))
