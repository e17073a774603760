"""Packing documents into one global stream of fixed-size token windows, and each rank's slice of it.

Every document is tokenized with BOS and EOS and appended to one token stream, which is cut into
consecutive, non-overlapping windows of `seq_len + 1` tokens (input = window[:-1], labels = window[1:]).
The stream depends only on the data, the tokenizer and `seq_len`: never on the parallel layout. Batch c of
data-parallel rank r (of D, `local_batch_size` L) is windows [c*L*D + r*L, c*L*D + (r+1)*L).

Each rank (and each loader worker) walks the whole stream and keeps only its own windows, so every rank
tokenizes all documents: negligible for local corpora and moderate degrees, but at a data-parallel degree
of hundreds on a large corpus the tokenizer runs D times over the data. Token files pretokenized from the
same documents (`token_dataset`) give the same windows, each rank reading only its own.
"""

from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import IterableDataset, get_worker_info

from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import ConfigError
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)


class DocumentSource(Protocol):
    description: str

    def documents(self, state: dict | None) -> Iterator[tuple[dict | None, str]]:
        """Yield (source state just before the document, text), starting at `state` (None: the start)."""
        ...


@dataclass(frozen=True)
class StreamPosition:
    """A point in the window stream, identical on every rank and loader worker that reached it.

    `window`: windows consumed so far. The next window starts `offset` tokens into the document read from
    source state `source` (None: the first document) during pass `epoch` over the data.
    """

    window: int = 0
    epoch: int = 0
    source: dict | None = None
    offset: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "StreamPosition":
        return cls(**{k: state[k] for k in ("window", "epoch", "source", "offset")})


class TokenWindows:
    """Iterates the global window stream from `start`; `position` is the point after the last window."""

    def __init__(
        self, source: DocumentSource, tokenizer: BaseTokenizer, window_len: int, infinite: bool, start: StreamPosition
    ):
        self._source = source
        self._tokenizer = tokenizer
        self._window_len = window_len
        self._infinite = infinite
        self.position = start

    def __iter__(self) -> Iterator[list[int]]:
        n = self._window_len
        epoch = self.position.epoch
        docs = self._source.documents(self.position.source)
        # `tokens` starts at the first token of the front document of `front`, which holds the cursor.
        front: deque[tuple[int, dict | None, int]] = deque()  # (epoch, source state, token count) per document
        tokens: list[int] = []
        cursor = self.position.offset
        docs_this_pass = 0
        while True:
            while len(tokens) - cursor < n:
                item = next(docs, None)
                if item is None:
                    if docs_this_pass == 0:
                        raise ConfigError(f"{self._source.description} contains no documents")
                    if not self._infinite:
                        return
                    epoch += 1
                    docs_this_pass = 0
                    logger.info(f"{self._source.description}: pass {epoch} done, re-looping from the start")
                    docs = self._source.documents(None)
                    continue
                state, text = item
                ids = self._tokenizer.encode(text, bos=True, eos=True)
                front.append((epoch, state, len(ids)))
                tokens.extend(ids)
                docs_this_pass += 1
            window = tokens[cursor : cursor + n]
            cursor += n
            while len(front) > 1 and cursor >= front[0][2]:
                done = front.popleft()[2]
                del tokens[:done]
                cursor -= done
            doc_epoch, doc_state, _ = front[0]
            self.position = StreamPosition(self.position.window + 1, doc_epoch, doc_state, cursor)
            yield window


Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def loader_worker() -> tuple[int, int]:
    """(this loader worker's id, number of workers); (0, 1) outside DataLoader workers."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class WindowDataset(IterableDataset):
    """One data-parallel rank's batches of the global window stream, resumable (torchdata `Stateful`).

    Yields ({"input": LongTensor[L, seq_len]}, labels LongTensor[L, seq_len]). With W loader workers, worker
    w produces global batch chunks w, w + W, ... (the loader interleaves them back in order). `state_dict()`
    is the stream position after the last batch this copy yielded, the same on every rank. Subclasses say
    where windows come from: `format` is "documents" (tokenized while streaming) or "tokens" (token files).
    """

    format = "documents"
    shuffle_seed: int | None = None

    def __init__(
        self,
        name: str,
        seq_len: int,
        local_batch_size: int,
        dp_world_size: int,
        dp_rank: int,
        infinite: bool,
        pad_last: bool = False,
    ):
        if seq_len < 1 or local_batch_size < 1:
            raise ConfigError(f"seq_len={seq_len} and local_batch_size={local_batch_size} must be positive")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_world_size={dp_world_size})")
        self.name = name
        self.seq_len = seq_len
        self.local_batch_size = local_batch_size
        self.dp_world_size = dp_world_size
        self.dp_rank = dp_rank
        self.infinite = infinite
        # A finite stream ending inside a global chunk yields that chunk too, its missing rows padded (see
        # `batch`), so every window is used and every rank gets the same number of batches whatever the layout.
        self.pad_last = pad_last and not infinite
        self._start = self._position = StreamPosition()

    def batch(self, windows: torch.Tensor) -> Batch:
        """The (inputs, labels) of a LongTensor[rows, seq_len + 1] of windows; fewer than `local_batch_size`
        rows (the padded last chunk) are completed by rows of token 0 whose labels are all IGNORE_INDEX."""
        missing = self.local_batch_size - windows.shape[0]
        inputs, labels = windows[:, :-1], windows[:, 1:]
        if missing > 0:
            inputs = torch.cat([inputs, inputs.new_zeros(missing, self.seq_len)])
            labels = torch.cat([labels, labels.new_full((missing, self.seq_len), IGNORE_INDEX)])
        return {"input": inputs.contiguous()}, labels.contiguous()

    def state_dict(self) -> dict[str, Any]:
        return self._position.to_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Start the next iteration at this position."""
        self._start = self._position = StreamPosition.from_dict(state_dict)


class TextWindowDataset(WindowDataset):
    """The window stream of documents tokenized on the fly (every rank walks the whole stream)."""

    def __init__(
        self,
        source: DocumentSource,
        tokenizer: BaseTokenizer,
        name: str,
        seq_len: int,
        local_batch_size: int,
        dp_world_size: int = 1,
        dp_rank: int = 0,
        infinite: bool = True,
        pad_last: bool = False,
    ):
        super().__init__(name, seq_len, local_batch_size, dp_world_size, dp_rank, infinite, pad_last)
        self.source = source
        self.tokenizer = tokenizer

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = loader_worker()
        stream = TokenWindows(self.source, self.tokenizer, self.seq_len + 1, self.infinite, self._start)
        windows = iter(stream)
        per_rank = self.local_batch_size
        mine = range(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)
        chunk = 0
        while True:
            keep = chunk % num_workers == worker
            rows = []
            ended = False
            for i in range(per_rank * self.dp_world_size):
                window = next(windows, None)
                if window is None:
                    ended = True
                    break
                if keep and i in mine:
                    rows.append(window)
            if ended and not (self.pad_last and i > 0):
                return
            chunk += 1
            if keep:
                self._position = stream.position
                yield self.batch(torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.seq_len + 1))
            if ended:
                return
