"""Finding the bad local data file, and where it is bad, after streaming it with `datasets` failed.

`datasets` parses lazily and its errors (mostly pyarrow's) name neither the file nor the line, so on that
error path only, the files are re-read with the standard library and pyarrow to find the first problem.
"""

import bz2
import gzip
import json
import lzma
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)
# What reading local data files can raise: bad compressed data, pyarrow's errors (ArrowInvalid is also a ValueError,
# ArrowIOError an OSError), `datasets`' CastError, JSON and UTF-8 errors (ValueErrors).
READ_ERRORS = (ValueError, pa.ArrowException, *DECOMPRESS_ERRORS)

COMPRESSED: dict[str, tuple[str, Callable[[Path], BinaryIO]]] = {
    ".gz": ("gzip", gzip.open),
    ".bz2": ("bz2", bz2.open),
    ".xz": ("xz", lzma.open),
}
UNCHECKED = {".zst"}  # needs the optional `zstandard` package


def one_line(e: BaseException) -> str:
    """The exception's type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


class _BadFile(Exception):
    """A problem found in a data file; the message is '<file>[:<line>]: <problem>' (one line)."""


def _open(path: Path) -> BinaryIO:
    """The file's bytes, decompressed as its suffix says."""
    return COMPRESSED[path.suffix][1](path) if path.suffix in COMPRESSED else open(path, "rb")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file, decompressed as its suffix says; raises _BadFile on unreadable data."""
    lineno = 0
    try:
        with _open(path) as f:
            for lineno, raw in enumerate(f, 1):
                yield lineno, raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadFile(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start + 1} of the line)") from None
    except DECOMPRESS_ERRORS as e:
        what = f"truncated or corrupt {COMPRESSED[path.suffix][0]} file" if path.suffix in COMPRESSED else "unreadable"
        raise _BadFile(f"{path}: {what} ({one_line(e)})") from None


def _parse(path: Path, text: str, first_line: int) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line, reason = first_line + e.lineno - 1, e.msg.removesuffix(" at")
        raise _BadFile(f"{path}:{line}: invalid JSON at column {e.colno} ({reason})") from None


def _check_json(path: Path, text_column: str) -> None:
    """JSON lines, one object per line; or one JSON document (a list of records) if it starts with '['."""
    lines = _lines(path)
    first = True
    for lineno, line in lines:
        if not line.strip():
            continue
        if first and line.lstrip().startswith("["):
            _parse(path, line + "".join(rest for _, rest in lines), lineno)
            return
        first = False
        if not isinstance(_parse(path, line, lineno), dict):
            raise _BadFile(f"{path}:{lineno}: not a JSON object")


def _check_text(path: Path, text_column: str) -> None:
    for _ in _lines(path):
        pass


def _check_parquet(path: Path, text_column: str) -> None:
    """A readable parquet file with a `text_column` column."""
    try:
        with _open(path) as f, pq.ParquetFile(f) as parquet:
            columns = parquet.schema_arrow.names
            if text_column in columns:
                for _ in parquet.iter_batches(columns=[text_column]):
                    pass
    except READ_ERRORS as e:
        raise _BadFile(f"{path}: not a valid parquet file ({one_line(e)})") from None
    if text_column not in columns:
        raise _BadFile(f"{path} has no {text_column!r} column (columns: {sorted(columns)})")


CHECKS: dict[str, Callable[[Path, str], None]] = {"json": _check_json, "text": _check_text, "parquet": _check_parquet}


def find_bad_file(files: list[str], builder: str, text_column: str, start: int = 0) -> str | None:
    """'<file>[:<line>]: <problem>' for the first bad one of `files` (read as the `datasets` builder `builder`
    would), checking from `files[start]` on and then the ones before it; None if no problem is found."""
    for name in files[start:] + files[:start]:
        path = Path(name)
        if path.suffix in UNCHECKED:
            continue
        try:
            CHECKS[builder](path, text_column)
        except _BadFile as e:
            return str(e)
    return None
