"""Text datasets: the registry (`registry`), document sources (`sources`) and packing into windows (`packing`)."""

from torchtitan.components.datasets.registry import DATASETS, DatasetSpec, get_dataset_spec

__all__ = ["DATASETS", "DatasetSpec", "get_dataset_spec"]
