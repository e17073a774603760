"""Document sources: a resumable stream of texts read with the Hugging Face `datasets` library."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtitan.components.datasets.diagnose import READ_ERRORS, find_bad_file, one_line
from torchtitan.components.datasets.registry import locate_dataset
from torchtitan.config import ConfigError

# File suffix (after dropping a compression suffix) -> `datasets` builder.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst"}


def _builder(path: Path) -> str | None:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


@dataclass(frozen=True)
class LocalFiles:
    """The local data files of a dataset, read with the `datasets` builder `builder`, and their config key."""

    origin: str  # e.g. "training.dataset_path='data/'"
    builder: str
    files: list[str]
    text_column: str

    def error(self, e: BaseException, shard: int = 0) -> ConfigError:
        """A one-line error for `e`, raised reading the files (`files[shard]` is the likely culprit): it names
        the first bad file, and the line, that a re-read finds."""
        bad = find_bad_file(self.files, self.builder, self.text_column, start=shard)
        if bad:
            return ConfigError(f"{self.origin}: {bad}; fix or remove that file")
        return ConfigError(f"{self.origin}: cannot read {self.files[shard]} as {self.builder} ({one_line(e)})")

    def shard(self, state: dict) -> int:
        """The index of the file a `datasets` stream is reading, from its state (0 if not found there)."""
        while "examples_iterable" in state:
            state = state["examples_iterable"]
        shard = state.get("shard_idx", 0)
        return shard if 0 <= shard < len(self.files) else 0


class HFDocuments:
    """The documents of a streaming `datasets.IterableDataset`, resumable from the state before any of them.

    Iterates with `IterableDataset.iter`, not `iter(dataset)`: inside a DataLoader worker the latter would
    shard the data by worker, while every worker here must see the whole stream. For `local` files, a read
    error (a corrupt file) becomes a one-line ConfigError naming the file.
    """

    def __init__(self, dataset: Any, text_column: str, description: str, local: LocalFiles | None = None):
        self._dataset = dataset
        self._text_column = text_column
        self._local = local
        self.description = description

    def documents(self, state: dict | None) -> Iterator[tuple[dict | None, str]]:
        """Yield (source state just before the document, document text), starting at `state` (None: the start)."""
        self._dataset.load_state_dict(state)
        before = state
        try:
            for batch in self._dataset.iter(batch_size=1):
                if self._text_column not in batch:
                    raise self._missing_column(sorted(batch))
                yield before, batch[self._text_column][0] or ""
                before = self._dataset.state_dict()
        except READ_ERRORS as e:
            if self._local is None:
                raise
            raise self._local.error(e, self._local.shard(self._dataset.state_dict())) from None

    def _missing_column(self, columns: list[str]) -> ConfigError:
        where = self.description
        if self._local is not None:
            where = f"{self._local.origin}: {self._local.files[self._local.shard(self._dataset.state_dict())]}"
        return ConfigError(
            f"{where} has no {self._text_column!r} column (columns: {columns}); "
            "use a dataset whose documents are in a 'text' field"
        )


def _local_files(root: Path, pattern: str | None, origin: str) -> tuple[str, list[str]]:
    """The builder and sorted data files of a local file or folder (`pattern` first, if it matches)."""
    if root.is_file():
        files = [root]
    else:
        files = sorted(root.glob(pattern)) if pattern else []
        if not files:
            files = sorted(p for p in root.rglob("*") if p.is_file() and _builder(p) and not p.name.startswith("."))
    builders = {_builder(p) for p in files}
    if not files or None in builders:
        raise ConfigError(
            f"{origin}: {root} holds no supported data files; expected .json/.jsonl/.parquet/.txt files "
            "(optionally .gz compressed)"
        )
    if len(builders) > 1:
        raise ConfigError(f"{origin}: {root} mixes data formats {sorted(builders)}; keep one format per dataset")
    return builders.pop(), [str(p) for p in files]


def _looks_local(location: str) -> bool:
    return location.startswith((".", "/", "~")) or _builder(Path(location)) is not None


def load_documents(name: str, dataset_path: str | None, section: str) -> HFDocuments:
    """The documents of the registered dataset `name` (or of `dataset_path`, which overrides its location).

    Local files stream from disk (json/jsonl/parquet: one document per record; txt: one per file); a hub id
    streams from the Hugging Face hub. `section` ("training"/"validation") names the config keys in errors.
    """
    from datasets import load_dataset

    where = locate_dataset(name, dataset_path, section)
    spec, location, origin, local = where.spec, where.location, where.origin, where.local
    if local is not None:
        builder, files = _local_files(local, spec.data_files, origin)
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        local_files = LocalFiles(origin, builder, files, spec.text_column)
        try:
            dataset = load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
        except (StopIteration, *READ_ERRORS) as e:  # the json loader raises StopIteration on empty files
            raise local_files.error(e) from None
        description = f"{origin} ({len(files)} {builder} files in {location})"
        return HFDocuments(dataset, spec.text_column, description, local_files)
    if _looks_local(location):
        raise ConfigError(f"{origin} does not exist; give an existing file or folder, or a hub dataset id")
    try:
        dataset = load_dataset(location, name=spec.hub_config, split=spec.split, streaming=True)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{origin}: cannot load {location!r} from the Hugging Face hub ({one_line(e)}); check the id and "
            "network, or use a local copy"
        ) from None
    return HFDocuments(dataset, spec.text_column, f"{origin} (hub {location!r}, split {spec.split})")
