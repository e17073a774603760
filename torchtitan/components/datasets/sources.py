"""Document sources: a resumable stream of texts read with the Hugging Face `datasets` library."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torchtitan.components.datasets.paths import resolve_path
from torchtitan.components.datasets.registry import get_dataset_spec
from torchtitan.config import ConfigError

# File suffix (after dropping a compression suffix) -> `datasets` builder.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst"}


def _builder(path: Path) -> str | None:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


class HFDocuments:
    """The documents of a streaming `datasets.IterableDataset`, resumable from the state before any of them.

    Iterates with `IterableDataset.iter`, not `iter(dataset)`: inside a DataLoader worker the latter would
    shard the data by worker, while every worker here must see the whole stream.
    """

    def __init__(self, dataset: Any, text_column: str, description: str):
        self._dataset = dataset
        self._text_column = text_column
        self.description = description

    def documents(self, state: dict | None) -> Iterator[tuple[dict | None, str]]:
        """Yield (source state just before the document, document text), starting at `state` (None: the start)."""
        self._dataset.load_state_dict(state)
        before = state
        for batch in self._dataset.iter(batch_size=1):
            if self._text_column not in batch:
                raise ConfigError(
                    f"{self.description} has no {self._text_column!r} column (columns: {sorted(batch)}); "
                    "use a dataset whose documents are in a 'text' field"
                )
            yield before, batch[self._text_column][0] or ""
            before = self._dataset.state_dict()


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


def _reason(e: BaseException) -> str:
    """One line describing a loading error (ConfigError messages are single lines)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _looks_local(location: str) -> bool:
    return location.startswith((".", "/", "~")) or _builder(Path(location)) is not None


def load_documents(name: str, dataset_path: str | None, section: str) -> HFDocuments:
    """The documents of the registered dataset `name` (or of `dataset_path`, which overrides its location).

    Local files stream from disk (json/jsonl/parquet: one document per record; txt: one per file); a hub id
    streams from the Hugging Face hub. `section` ("training"/"validation") names the config keys in errors.
    """
    from datasets import load_dataset

    spec = get_dataset_spec(name, dataset_path, section)
    location = dataset_path or spec.path
    origin = f"{section}.dataset_path={dataset_path!r}" if dataset_path else f"{section}.dataset={name!r}"
    local = resolve_path(location)
    if local is not None:
        builder, files = _local_files(local, spec.data_files, origin)
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            dataset = load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
        except (StopIteration, ValueError, OSError) as e:  # the json loader raises StopIteration on empty files
            raise ConfigError(f"{origin}: cannot read {local} as {builder} ({_reason(e)})") from None
        return HFDocuments(dataset, spec.text_column, f"{origin} ({len(files)} {builder} files in {location})")
    if _looks_local(location):
        raise ConfigError(f"{origin} does not exist; give an existing file or folder, or a hub dataset id")
    try:
        dataset = load_dataset(location, name=spec.hub_config, split=spec.split, streaming=True)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{origin}: cannot load {location!r} from the Hugging Face hub ({_reason(e)}); check the id and "
            "network, or use a local copy"
        ) from None
    return HFDocuments(dataset, spec.text_column, f"{origin} (hub {location!r}, split {spec.split})")
