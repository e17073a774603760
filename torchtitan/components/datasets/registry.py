"""Registered text datasets: where each lives and how it is read."""

from dataclasses import dataclass
from pathlib import Path

from torchtitan.components.datasets.paths import resolve_path
from torchtitan.config import ConfigError


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset.

    `path` is a local path (relative paths also resolve against the repository root) or a Hugging Face hub
    id; None means the user must give one in `dataset_path`. `data_files` selects files inside a local folder
    (all supported data files when it matches none); `hub_config` and `split` apply to hub datasets.
    """

    path: str | None
    split: str = "train"
    hub_config: str | None = None
    data_files: str | None = None
    text_column: str = "text"


DATASETS: dict[str, DatasetSpec] = {
    "shakespeare": DatasetSpec("tests/assets/shakespeare", data_files="train-*.jsonl.gz"),
    "shakespeare_validation": DatasetSpec("tests/assets/shakespeare", data_files="validation-*.jsonl.gz"),
    "c4": DatasetSpec("allenai/c4", hub_config="en", data_files="en/c4-train.*.json.gz"),
    "c4_validation": DatasetSpec(
        "allenai/c4", split="validation", hub_config="en", data_files="en/c4-validation.*.json.gz"
    ),
    # torchtitan's small C4 sample: not shipped here, usable with a dataset_path pointing at a copy.
    "c4_test": DatasetSpec(None),
}


def get_dataset_spec(name: str, dataset_path: str | None, section: str) -> DatasetSpec:
    """The spec registered as `name`; `section` ("training"/"validation") names the config keys in errors."""
    spec = DATASETS.get(name)
    if spec is None:
        raise ConfigError(
            f"{section}.dataset={name!r} is not a registered dataset; known datasets: {', '.join(sorted(DATASETS))} "
            f"(to train on your own files use one of them with {section}.dataset_path)"
        )
    if spec.path is None and not dataset_path:
        raise ConfigError(
            f"{section}.dataset={name!r} is torchtitan's C4 sample, which this repository does not ship; set "
            f"{section}.dataset_path to a local copy (json/jsonl/parquet/txt file or folder) or use "
            f"{section}.dataset='shakespeare'"
        )
    return spec


@dataclass(frozen=True)
class DatasetLocation:
    """Where a configured dataset is read from.

    `location` is `dataset_path` or else the registered path; `origin` is the config key and value that
    errors name; `local` is the existing local file or folder it resolves to (None: a hub id, or missing).
    """

    spec: DatasetSpec
    location: str
    origin: str
    local: Path | None


def locate_dataset(name: str, dataset_path: str | None, section: str) -> DatasetLocation:
    """The location of `{section}.dataset` / `{section}.dataset_path` (`section`: "training"/"validation")."""
    spec = get_dataset_spec(name, dataset_path, section)
    location = dataset_path or spec.path
    origin = f"{section}.dataset_path={dataset_path!r}" if dataset_path else f"{section}.dataset={name!r}"
    return DatasetLocation(spec, location, origin, resolve_path(location))
