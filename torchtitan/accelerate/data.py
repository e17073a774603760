"""A user's DataLoader re-sharded over data-parallel ranks with a layout-independent global order.

Global batch k of an epoch is positions [kG, (k+1)G) of the epoch's order (a seeded permutation when the
user's loader shuffled, else the dataset order), G = batch_size x data-parallel degree; DP rank r takes
its r-th slice of batch_size samples. So one process with batch G and D ranks with G/D each see the same
samples per step, and the position (epoch, samples consumed) resumes under any layout with the same G.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from torchtitan.config.errors import ConfigError


class _RankBatchSampler:
    """This rank's index lists for global batches `start`, `start+1`, ... of one epoch."""

    def __init__(self, order: list[int], batch_size: int, dp_rank: int, dp_world: int, start: int):
        self.order, self.batch_size, self.dp_rank, self.dp_world, self.start = (
            order, batch_size, dp_rank, dp_world, start
        )

    def __len__(self) -> int:
        return len(self.order) // (self.batch_size * self.dp_world) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        g = self.batch_size * self.dp_world
        for k in range(self.start, len(self.order) // g):
            first = k * g + self.dp_rank * self.batch_size
            yield self.order[first : first + self.batch_size]


def move_to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor (in nested dicts, lists and tuples) moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


class PreparedDataLoader:
    """Iterates the user's dataset like their DataLoader (same collate_fn, workers, pin_memory), but
    sharded by data-parallel rank in the global order above; stateful (`state_dict`/`load_state_dict`).

    Incomplete last global batches are dropped, so every rank gets the same number of batches.
    """

    def __init__(self, loader: DataLoader, dp_rank: int, dp_world: int, seed: int, device: torch.device):
        if loader.batch_size is None:
            raise ConfigError(
                "prepare(): the DataLoader has a custom batch_sampler; give it batch_size= (and shuffle=) "
                "so its batches can be re-sharded over data-parallel ranks"
            )
        if isinstance(loader.dataset, torch.utils.data.IterableDataset):
            raise ConfigError(
                "prepare(): an IterableDataset cannot be re-sharded by index; use a map-style Dataset"
            )
        self.loader = loader
        self.dataset = loader.dataset
        self.batch_size = loader.batch_size
        self.shuffle = isinstance(loader.sampler, RandomSampler)
        self.dp_rank, self.dp_world, self.seed, self.device = dp_rank, dp_world, seed, device
        self.epoch = 0
        self.batches_done = 0  # global batches of this epoch already handed out

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.dp_world

    def __len__(self) -> int:
        return len(self.dataset) // self.global_batch_size

    def _order(self) -> list[int]:
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(n, generator=generator).tolist()

    def __iter__(self) -> Iterator[Any]:
        sampler = _RankBatchSampler(self._order(), self.batch_size, self.dp_rank, self.dp_world, self.batches_done)
        src = self.loader
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=src.collate_fn,
            num_workers=src.num_workers,
            pin_memory=src.pin_memory,
            timeout=src.timeout,
            worker_init_fn=src.worker_init_fn,
            multiprocessing_context=src.multiprocessing_context,
        )
        for batch in loader:
            self.batches_done += 1
            yield move_to_device(batch, self.device)
        self.epoch += 1
        self.batches_done = 0

    def state_dict(self) -> dict[str, int]:
        """The position in the global order: epoch and samples consumed (independent of the layout)."""
        return {"epoch": self.epoch, "samples_done": self.batches_done * self.global_batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        samples = int(state["samples_done"])
        if samples % self.global_batch_size:
            raise ConfigError(
                f"cannot resume the dataloader at sample {samples}: not a multiple of this run's global batch "
                f"{self.global_batch_size} (batch_size x data-parallel degree); keep the global batch size"
            )
        self.epoch = int(state["epoch"])
        self.batches_done = samples // self.global_batch_size
