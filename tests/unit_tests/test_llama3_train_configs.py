"""The shipped Llama 3 presets use only known config keys and name real flavors."""

import dataclasses
import tomllib
from pathlib import Path

import pytest

from torchtitan.config import JobConfig
from torchtitan.models.llama3 import llama3_args

CONFIGS = Path(__file__).parents[2] / "torchtitan" / "models" / "llama3" / "train_configs"


def unknown_keys(table: dict, section: object, prefix: str = "") -> list[str]:
    known = {f.name for f in dataclasses.fields(section)}
    bad = []
    for key, value in table.items():
        if key not in known:
            bad.append(prefix + key)
        elif isinstance(value, dict):
            bad += unknown_keys(value, getattr(section, key), f"{prefix}{key}.")
    return bad


@pytest.mark.parametrize(
    "name, flavor, tp", [("llama3_8b", "8B", 1), ("llama3_70b", "70B", 8), ("llama3_405b", "405B", 8)]
)
def test_presets(name, flavor, tp):
    config = tomllib.loads((CONFIGS / f"{name}.toml").read_text())
    assert unknown_keys(config, JobConfig()) == []
    assert (config["model"]["name"], config["model"]["flavor"]) == ("llama3", flavor)
    assert config["model"]["hf_assets_path"] == f"./assets/hf/Llama-3.1-{flavor}"
    assert config["training"]["dataset"] == "c4" and config["training"]["seq_len"] == 8192
    assert config["parallelism"]["data_parallel_shard_degree"] == -1
    assert config["parallelism"]["tensor_parallel_degree"] == tp
    assert llama3_args[flavor].n_heads % tp == 0 and llama3_args[flavor].kv_heads % tp == 0
