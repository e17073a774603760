"""The data-parallel-aware, checkpointable text dataloader.

Batch c of data-parallel rank r is its slice of global chunk c of the window stream (see
`torchtitan.components.datasets.packing`), so a trainer drawing `grad_accum` batches per step sees windows
[k*G, (k+1)*G) at step k whatever the layout. The checkpointed state is the global stream position. The
windows come from documents tokenized while streaming, or from pretokenized token files when the dataset
points at a token folder (`torchtitan.components.datasets.token_dataset`).
"""

import json
import warnings
from collections.abc import Iterator
from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader

from torchtitan.components.datasets.packing import Batch, StreamPosition, TextWindowDataset, WindowDataset
from torchtitan.components.datasets.registry import locate_dataset
from torchtitan.components.datasets.sources import load_documents
from torchtitan.components.datasets.token_dataset import TokenFileDataset
from torchtitan.components.datasets.token_files import open_token_files, token_folder
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import ConfigError
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)


class DataExhaustedError(Exception):
    """A finite dataset has no complete chunk of local_batch_size * dp_world_size windows left.

    Raised by `next()` on the loader's iterator (on every rank at the same chunk); the trainer ends the run on it.
    """


class _Batches(Iterator[Batch]):
    """The loader's iterator: its batches in order, then DataExhaustedError instead of StopIteration."""

    def __init__(self, inner: Iterator[Batch], loader: "ParallelAwareDataloader"):
        self._inner = inner
        self._loader = loader

    def __next__(self) -> Batch:
        try:
            return next(self._inner)
        except StopIteration:
            dataset = self._loader.dataset
            raise DataExhaustedError(
                f"dataset {dataset.name!r} is exhausted after {self._loader.position().window} windows of "
                f"{dataset.seq_len + 1} tokens"
            ) from None
        except ConfigError as e:
            original = _worker_message(e)
            if original is None:
                raise
            raise type(e)(original) from None


def _worker_message(e: ConfigError) -> str | None:
    """The original message of a ConfigError raised in a loader worker, or None if `e` was not.

    torch re-raises it in the main process as "Caught ConfigError in DataLoader worker process N.\nOriginal
    Traceback (most recent call last):\n...\n<module>.ConfigError: <message>".
    """
    text = str(e)
    if not text.startswith(f"Caught {type(e).__name__} in DataLoader worker"):
        return None
    prefix = f"\n{type(e).__module__}.{type(e).__qualname__}: "
    start = text.rfind(prefix)
    return text[start + len(prefix) :].strip() if start >= 0 else None


class ParallelAwareDataloader(StatefulDataLoader):
    """A torchdata StatefulDataLoader over one rank's `WindowDataset`, yielding (input_dict, labels).

    `state_dict()` is `{"global_window": int, "stream": str}` (the stream position as JSON): the same on every
    data-parallel rank and for any number of workers, so a state saved at one data-parallel degree loads
    exactly at another. A new `iter()` continues from the current position (so `persistent_workers` is not
    used); to replay a finite dataset, load the state taken before the first pass.
    """

    dataset: WindowDataset

    def __init__(
        self,
        dataset: WindowDataset,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ):
        with warnings.catch_warnings():  # torchdata 0.11 calls the deprecated torch.set_vital
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            super().__init__(
                dataset,
                batch_size=None,  # the dataset yields whole batches
                num_workers=num_workers,
                pin_memory=pin_memory,
                prefetch_factor=prefetch_factor if num_workers > 0 else None,
                snapshot_every_n_steps=1,
            )
        self.dp_rank = dataset.dp_rank
        self.dp_world_size = dataset.dp_world_size

    def __iter__(self) -> Iterator[Batch]:
        if self._iterator is not None:
            self.dataset.load_state_dict(self.position().to_dict())
        return _Batches(super().__iter__(), self)

    def position(self) -> StreamPosition:
        """The stream position after the last batch this loader yielded."""
        if self._iterator is None or self.num_workers == 0:
            return StreamPosition.from_dict(self.dataset.state_dict())
        # torchdata's snapshot holds, per worker, the dataset state sent with that worker's latest batch that
        # has been yielded (prefetched batches are not included); the furthest one is the loader's position.
        workers = super().state_dict()["_snapshot"]["_worker_snapshots"].values()
        return max((StreamPosition.from_dict(w["dataset_state"]) for w in workers), key=lambda p: p.window)

    def state_dict(self) -> dict[str, Any]:
        position = self.position()
        stream = {"dataset": self.dataset.name, "seq_len": self.dataset.seq_len, "position": position.to_dict()}
        if self.dataset.format != "documents":
            stream.update(format=self.dataset.format, shuffle_seed=self.dataset.shuffle_seed)
        return {"global_window": position.window, "stream": json.dumps(stream, sort_keys=True)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the saved global position (any data-parallel degree or worker count).

        Token files also resume a state saved by the streaming path (their windows are the same), not the
        other way round: the streaming path cannot seek to a window index."""
        stream = json.loads(state_dict["stream"])
        saved = (stream["dataset"], stream["seq_len"], stream.get("shuffle_seed"))
        ours = (self.dataset.name, self.dataset.seq_len, self.dataset.shuffle_seed)
        if saved != ours:
            raise ConfigError(
                f"the checkpoint's dataloader state is for dataset {_describe(*saved)}, but this job uses "
                f"{_describe(*ours)}; restore those settings or add 'dataloader' to checkpoint.exclude_from_loading"
            )
        if stream.get("format", "documents") != "documents" and self.dataset.format == "documents":
            raise ConfigError(
                f"the checkpoint's dataloader state is a window index into token files, which the streaming path "
                f"cannot resume; keep {self.dataset.name!r} as token files (dataset_path pointing at the token "
                "folder) or add 'dataloader' to checkpoint.exclude_from_loading"
            )
        position = StreamPosition.from_dict(stream["position"])
        chunk = self.dataset.local_batch_size * self.dp_world_size
        if position.window % chunk:
            logger.warning(
                f"resuming at global window {position.window}, not a multiple of local_batch_size * dp_world_size "
                f"= {chunk}: the global batch size changed, so batches no longer align with the saved run's"
            )
        self.dataset.load_state_dict(position.to_dict())
        super().load_state_dict({})  # drop any running iterator; the next iter() starts at `position`


def _describe(dataset: str, seq_len: int, shuffle_seed: int | None) -> str:
    seed = f" and shuffle_seed {shuffle_seed}" if shuffle_seed is not None else ""
    return f"{dataset!r} with seq_len {seq_len}{seed}"


def _build(
    section: str,
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config: Any,
    infinite: bool,
    pad_last: bool = False,
) -> ParallelAwareDataloader:
    cfg = getattr(job_config, section)
    loader_cfg = job_config.training.dataloader
    shuffle_seed = job_config.training.shuffle_seed if section == "training" else None
    where = locate_dataset(cfg.dataset, cfg.dataset_path, section)
    folder = token_folder(where)
    layout = dict(
        name=cfg.dataset,
        seq_len=cfg.seq_len,
        local_batch_size=cfg.local_batch_size,
        dp_world_size=dp_world_size,
        dp_rank=dp_rank,
        infinite=infinite,
        pad_last=pad_last,
    )
    if folder is not None:
        tokens = open_token_files(folder, where.origin, tokenizer, job_config.model.hf_assets_path)
        dataset: WindowDataset = TokenFileDataset(tokens, shuffle_seed=shuffle_seed, **layout)
    elif shuffle_seed is not None:
        raise ConfigError(
            f"training.shuffle_seed={shuffle_seed} needs pretokenized token files, but {where.origin} is read as "
            f"documents, which are not shuffled; unset training.shuffle_seed, or pretokenize the data "
            "(scripts/data/pretokenize.py) and point training.dataset_path at the output folder"
        )
    else:
        dataset = TextWindowDataset(load_documents(cfg.dataset, cfg.dataset_path, section), tokenizer, **layout)
    if loader_cfg.persistent_workers:
        logger.warning("training.dataloader.persistent_workers is ignored: each iter() continues the stream")
    return ParallelAwareDataloader(
        dataset,
        num_workers=loader_cfg.num_workers,
        pin_memory=loader_cfg.pin_memory,
        prefetch_factor=loader_cfg.prefetch_factor,
    )


def build_text_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer: BaseTokenizer, job_config: Any, infinite: bool = True
) -> ParallelAwareDataloader:
    """The training dataloader of data-parallel rank `dp_rank`: `training.dataset`/`dataset_path`/`seq_len`/
    `local_batch_size` and `training.dataloader.*`."""
    return _build("training", dp_world_size, dp_rank, tokenizer, job_config, infinite)


def build_text_validation_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer: BaseTokenizer, job_config: Any, infinite: bool = False
) -> ParallelAwareDataloader:
    """The validation dataloader: `validation.dataset`/`dataset_path`/`seq_len`/`local_batch_size`.

    A finite split ends with its last, partial global chunk padded (labels IGNORE_INDEX), so every complete
    window is evaluated once and every rank yields the same number of batches, whatever the layout."""
    return _build("validation", dp_world_size, dp_rank, tokenizer, job_config, infinite, pad_last=True)
