"""Pretokenized token files: a folder of flat token shards and the JSON index that describes them.

A folder written by `scripts/data/pretokenize.py` holds `shard-00000.bin`, `shard-00001.bin`, ... (the
token ids of every document, with BOS and EOS exactly as the streaming path adds them, concatenated in
document order; little-endian uint16 when the vocabulary fits, else uint32) and `token_index.json`,
written last, so a folder without it is unfinished. The index holds the dtype, the tokenizer fingerprint,
the document and token counts, and each shard's token count, document count and sha256.
"""

import json
from bisect import bisect_right
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from torchtitan.components.datasets.diagnose import one_line
from torchtitan.components.datasets.registry import DatasetLocation
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import ConfigError

INDEX_NAME = "token_index.json"
FORMAT = "torchtitan-token-files"
VERSION = 1
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
REBUILD = "scripts/data/pretokenize.py"
MAX_OPEN_SHARDS = 64


def dtype_for(vocab_size: int) -> str:
    """The narrowest token dtype holding ids [0, vocab_size)."""
    return next(name for name, dtype in DTYPES.items() if vocab_size <= np.iinfo(dtype).max + 1)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


def token_folder(where: DatasetLocation) -> Path | None:
    """The token folder a configured dataset points at (the folder or its index file), else None."""
    local = where.local
    if local is None:
        return None
    if local.is_file() and local.name == INDEX_NAME:
        return local.parent
    return local if (local / INDEX_NAME).is_file() else None


class TokenFiles:
    """The memory-mapped token stream of a token folder; `read_into` reads it at any offset.

    Shards are mapped on first use in each process that reads (maps are not pickled into loader workers).
    Each map holds a file descriptor, so only the MAX_OPEN_SHARDS most recently used stay open.
    """

    def __init__(self, folder: Path, index: dict[str, Any]):
        self.folder = folder
        self.dtype = DTYPES[index["dtype"]]
        self.files = [folder / shard["file"] for shard in index["shards"]]
        self.sizes = [shard["tokens"] for shard in index["shards"]]
        self.num_tokens = sum(self.sizes)
        self._starts = np.cumsum([0, *self.sizes]).tolist()
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": OrderedDict()}

    def _map(self, shard: int) -> np.ndarray:
        if shard in self._maps:
            self._maps.move_to_end(shard)
        else:
            self._maps[shard] = np.memmap(self.files[shard], dtype=self.dtype, mode="r")
            if len(self._maps) > MAX_OPEN_SHARDS:
                self._maps.popitem(last=False)
        return self._maps[shard]

    def read_into(self, out: np.ndarray, start: int) -> None:
        """Fill the 1-D `out` with the stream's tokens from offset `start` on; the stream repeats forever."""
        position = start % self.num_tokens
        filled = 0
        while filled < len(out):
            shard = bisect_right(self._starts, position) - 1  # empty shards are never picked
            offset = position - self._starts[shard]
            take = min(len(out) - filled, self.sizes[shard] - offset)
            out[filled : filled + take] = self._map(shard)[offset : offset + take]
            filled += take
            position = (position + take) % self.num_tokens


def read_index(folder: Path) -> dict[str, Any]:
    """The parsed index of a token folder; ValueError (one line) if it is not a valid one."""
    path = folder / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({one_line(e)})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{path} is not a version-{VERSION} {FORMAT} index")
    return index


def open_token_files(folder: Path, origin: str, tokenizer: BaseTokenizer, tokenizer_path: str) -> TokenFiles:
    """The token stream in `folder` (named by the config `origin`), checked against the job's tokenizer
    (loaded from `tokenizer_path`, the value of model.hf_assets_path) and against the shard files on disk."""
    rebuild = f"delete {folder} and run {REBUILD} again"
    try:
        index = read_index(folder)
    except ValueError as e:
        raise ConfigError(f"{origin}: {e}; {rebuild}") from None
    dtype = index["dtype"]
    if tokenizer.vocab_size > np.iinfo(DTYPES[dtype]).max + 1:
        raise ConfigError(
            f"{origin}: {folder} stores {dtype} tokens, but the tokenizer in model.hf_assets_path="
            f"{tokenizer_path!r} has {tokenizer.vocab_size} ids, more than {dtype} holds; point "
            f"model.hf_assets_path at the tokenizer the files were made with, or pretokenize again ({REBUILD} "
            f"--hf_assets_path {tokenizer_path}, which picks {dtype_for(tokenizer.vocab_size)})"
        )
    made_with = index["tokenizer"]["fingerprint"]
    if made_with != tokenizer.fingerprint:
        raise ConfigError(
            f"{origin}: {folder} was tokenized with another tokenizer ({made_with}) than the one in "
            f"model.hf_assets_path={tokenizer_path!r} ({tokenizer.fingerprint}); point model.hf_assets_path at "
            f"the tokenizer the files were made with, or pretokenize again with --hf_assets_path {tokenizer_path}"
        )
    tokens = TokenFiles(folder, index)
    for path, count in zip(tokens.files, tokens.sizes):
        expected = count * tokens.dtype.itemsize
        if not path.is_file():
            raise ConfigError(f"{origin}: shard {path} listed in {INDEX_NAME} is missing; {rebuild}")
        if path.stat().st_size != expected:
            raise ConfigError(
                f"{origin}: shard {path} has {path.stat().st_size} bytes but {INDEX_NAME} says {expected} "
                f"({count} {dtype} tokens), so it is truncated or damaged; {rebuild}"
            )
    if tokens.num_tokens == 0:
        raise ConfigError(f"{origin}: {folder} holds no tokens; pretokenize a dataset with documents")
    return tokens
