"""TrainSpec: everything the generic trainer needs to train one model family, and its registry."""

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torchtitan.config.errors import ConfigError
from torchtitan.protocols.model import BaseModelArgs
from torchtitan.protocols.state_dict_adapter import StateDictAdapter


@dataclass
class TrainSpec:
    """The builders of one model family; the signatures are those of the team contract."""

    model_cls: type
    model_args: dict[str, BaseModelArgs]
    parallelize_fn: Callable
    pipelining_fn: Callable | None
    build_optimizers_fn: Callable
    build_lr_schedulers_fn: Callable
    build_dataloader_fn: Callable
    build_tokenizer_fn: Callable
    build_loss_fn: Callable
    build_validator_fn: Callable | None = None
    state_dict_adapter: type[StateDictAdapter] | None = None


_train_specs: dict[str, TrainSpec] = {}


def register_train_spec(name: str, spec: TrainSpec) -> None:
    """Make `spec` available as `model.name = name`; names are unique."""
    if name in _train_specs:
        raise ValueError(f"a TrainSpec named {name!r} is already registered")
    _train_specs[name] = spec


def get_train_spec(name: str) -> TrainSpec:
    """The TrainSpec registered as `name` (built-in models are registered on first use)."""
    importlib.import_module("torchtitan.models")
    if name not in _train_specs:
        raise ConfigError(
            f"model.name={name!r} is not a registered model; choose one of {sorted(_train_specs)} "
            "or register yours with --experimental.custom_import"
        )
    return _train_specs[name]
