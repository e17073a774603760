"""Fixtures shared by the unit tests of the data path."""

from pathlib import Path

import pytest

from torchtitan.components.datasets.pretokenize import pretokenize
from torchtitan.components.datasets.sources import load_documents
from torchtitan.config import JobConfig


@pytest.fixture(scope="session")
def shakespeare_tokens(tmp_path_factory) -> Path:
    """The shipped training corpus pretokenized with the shipped tokenizer, in shards of >= 200K tokens."""
    out = tmp_path_factory.mktemp("tokens") / "shakespeare"
    pretokenize(load_documents("shakespeare", None, "training"), JobConfig().model.hf_assets_path, out,
                shard_tokens=200_000)
    return out
