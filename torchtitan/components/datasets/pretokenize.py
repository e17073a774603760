"""Writing token files (the format of `token_files`): every document tokenized once, in parallel.

The output depends only on the documents, the tokenizer and `shard_tokens`, never on the number of
workers: workers tokenize batches of documents, the main process writes the results in document order,
and a shard ends with the document that brings it to at least `shard_tokens` tokens.

Everything is written into `<out>.partial/`. A shard is written as `<name>.tmp` and renamed once complete,
then recorded in `progress.json` with the source state of the next document; the index comes last, and
the folder is renamed to `<out>`. So `<out>` never exists unfinished, and a rerun after an interruption
resumes after the last complete shard (checked against its sha256) or, if the settings changed, restarts.
"""

import hashlib
import json
import os
import shutil
from collections import deque
from collections.abc import Iterator
from itertools import chain, islice
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from torchtitan.components.datasets.packing import DocumentSource
from torchtitan.components.datasets.token_files import DTYPES, FORMAT, INDEX_NAME, VERSION, dtype_for, shard_name
from torchtitan.components.tokenizer import BaseTokenizer, load_tokenizer
from torchtitan.config import ConfigError
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

PROGRESS_NAME = "progress.json"
DEFAULT_SHARD_TOKENS = 100_000_000
DOCS_PER_TASK = 256

# The tokenizer of this process (a pool worker, or the main process when tokenizing in-process).
_worker: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, dtype: str) -> None:
    _worker.update(tokenizer=load_tokenizer(tokenizer_path), dtype=DTYPES[dtype])


def _encode(texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """The concatenated tokens of `texts` (BOS and EOS around each, as the streaming path adds them) and the
    token count of each."""
    ids = [_worker["tokenizer"].encode(text, bos=True, eos=True) for text in texts]
    lengths = [len(doc) for doc in ids]
    return np.fromiter(chain.from_iterable(ids), dtype=_worker["dtype"], count=sum(lengths)), lengths


def _encoded(
    docs: Iterator[tuple[dict | None, str]], tokenizer_path: str, dtype: str, workers: int, docs_per_task: int
) -> Iterator[tuple[list[dict | None], np.ndarray, list[int]]]:
    """(source states, tokens, lengths) of consecutive batches of `docs`, in order, tokenized by `workers`
    processes (in this process when 1); at most 2 batches per worker are in flight."""
    tasks = iter(lambda: list(islice(docs, docs_per_task)), [])
    if workers == 1:
        _init_worker(tokenizer_path, dtype)
        for task in tasks:
            states, texts = zip(*task)
            yield list(states), *_encode(list(texts))
        return
    with Pool(workers, _init_worker, (tokenizer_path, dtype)) as pool:
        pending: deque = deque()
        for task in tasks:
            states, texts = zip(*task)
            pending.append((list(states), pool.apply_async(_encode, (list(texts),))))
            if len(pending) == 2 * workers:
                states, result = pending.popleft()
                yield states, *result.get()
        for states, result in pending:
            yield states, *result.get()


def _write_json(path: Path, value: Any) -> None:
    """Write `value` to `path` atomically (a complete file or none)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


class _ShardWriter:
    """Writes shards into the partial folder and records each complete one in its progress file."""

    def __init__(self, folder: Path, settings: dict[str, Any], shards: list[dict[str, Any]]):
        self.folder = folder
        self.settings = settings
        self.shards = shards
        self.tokens = 0
        self.documents = 0
        self._file = None
        self._digest = hashlib.sha256()

    def add(self, tokens: np.ndarray) -> None:
        """Append one document's tokens to the current shard (opened on first use)."""
        if self._file is None:
            self._file = open(self.folder / f"{shard_name(len(self.shards))}.tmp", "wb")
            self._digest = hashlib.sha256()
        data = tokens.tobytes()
        self._file.write(data)
        self._digest.update(data)
        self.tokens += len(tokens)
        self.documents += 1

    def finish(self) -> None:
        """Close the current shard and rename it to its final name."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = shard_name(len(self.shards))
        os.replace(self.folder / f"{name}.tmp", self.folder / name)
        digest = self._digest.hexdigest()
        self.shards.append({"file": name, "tokens": self.tokens, "documents": self.documents, "sha256": digest})
        self._file, self.tokens, self.documents = None, 0, 0

    def save_progress(self, next_state: dict | None) -> None:
        """Record the complete shards and the source state of the next document, where a rerun resumes."""
        progress = {"settings": self.settings, "shards": self.shards, "next": next_state}
        _write_json(self.folder / PROGRESS_NAME, progress)

    @property
    def writing(self) -> bool:
        return self._file is not None


def _resume(partial: Path, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], dict | None]:
    """The complete shards of an earlier run in `partial` with the same settings and the source state to
    continue from; ([], None) after clearing `partial` when there is nothing to resume."""
    progress = None
    try:
        progress = json.loads((partial / PROGRESS_NAME).read_text())
    except (OSError, ValueError):
        pass
    if progress is not None and progress.get("settings") != settings:
        logger.info(f"{partial} was written with other settings; starting over")
        progress = None
    if progress is not None:
        itemsize = DTYPES[settings["dtype"]].itemsize
        for shard in progress["shards"]:
            path = partial / shard["file"]
            intact = path.is_file() and path.stat().st_size == shard["tokens"] * itemsize
            if not intact or _sha256(path) != shard["sha256"]:
                logger.info(f"{path} does not match its recorded size and sha256; starting over")
                progress = None
                break
    if progress is None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        return [], None
    keep = {shard["file"] for shard in progress["shards"]} | {PROGRESS_NAME}
    for path in partial.iterdir():
        if path.name not in keep:  # a half-written shard, or the index of a run stopped before its rename
            path.unlink()
    documents = sum(shard["documents"] for shard in progress["shards"])
    logger.info(f"resuming {partial} after {len(progress['shards'])} complete shards ({documents} documents)")
    return progress["shards"], progress["next"]


def _settings(source: DocumentSource, tokenizer: BaseTokenizer, shard_tokens: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype_for(tokenizer.vocab_size),
        "tokenizer": {
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
        },
        "source": source.description,
        "shard_tokens": shard_tokens,
    }


def pretokenize(
    source: DocumentSource,
    tokenizer_path: str,
    out: Path,
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    docs_per_task: int = DOCS_PER_TASK,
) -> dict[str, Any]:
    """Tokenize every document of `source` with the tokenizer at `tokenizer_path` into the token folder
    `out` (see the module docstring); returns its index. A finished `out` with the same settings is kept."""
    if workers < 1 or shard_tokens < 1:
        raise ConfigError(f"--workers={workers} and --shard_tokens={shard_tokens} must be positive")
    settings = _settings(source, load_tokenizer(tokenizer_path), shard_tokens)
    if out.exists():
        try:
            done = json.loads((out / INDEX_NAME).read_text())
        except (OSError, ValueError):
            done = {}
        if {key: done.get(key) for key in settings} == settings:
            logger.info(f"{out} is already complete ({done['tokens']} tokens); nothing to do")
            return done
        raise ConfigError(
            f"--out {out} already exists and is not this command's finished output; remove it or choose another --out"
        )
    partial = out.with_name(out.name + ".partial")
    shards, state = _resume(partial, settings)
    writer = _ShardWriter(partial, settings, shards)
    docs = source.documents(state)
    progress = tqdm(unit=" docs", initial=sum(shard["documents"] for shard in shards), disable=None)
    for states, tokens, lengths in _encoded(docs, tokenizer_path, settings["dtype"], workers, docs_per_task):
        start = 0
        for state, length in zip(states, lengths):
            if writer.writing and writer.tokens >= shard_tokens:
                writer.finish()
                writer.save_progress(next_state=state)
            writer.add(tokens[start : start + length])
            start += length
        progress.update(len(states))
    progress.close()
    if writer.writing:
        writer.finish()
    num_tokens = sum(shard["tokens"] for shard in shards)
    if num_tokens == 0:
        raise ConfigError(f"{source.description} has no tokens to write; check the dataset")
    index = {
        **settings,
        "documents": sum(shard["documents"] for shard in shards),
        "tokens": num_tokens,
        "shards": shards,
    }
    _write_json(partial / INDEX_NAME, index)
    os.replace(partial, out)
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    logger.info(f"wrote {num_tokens} {settings['dtype']} tokens of {index['documents']} documents to {out}")
    return index
