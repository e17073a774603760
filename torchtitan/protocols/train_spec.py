"""TrainSpec: everything the generic trainer needs to train one model family, and its registry."""

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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
    """The TrainSpec registered as `name` (`import torchtitan.builtins` registers the built-in models)."""
    if name not in _train_specs:
        raise ConfigError(
            f"model.name={name!r} is not a registered model; choose one of {sorted(_train_specs)} "
            "or register yours with --experimental.custom_import"
        )
    return _train_specs[name]


def build_meta_model(spec: TrainSpec, job_config: Any, tokenizer: Any = None) -> tuple[BaseModelArgs, nn.Module]:
    """The args of `model.flavor`, completed from the job and the tokenizer (`update_from_config`), and the
    model built from them on the meta device. An unknown flavor is a ConfigError listing the flavors."""
    flavor = job_config.model.flavor
    if flavor not in spec.model_args:
        raise ConfigError(
            f"model.flavor={flavor!r} is not a flavor of {job_config.model.name!r}; "
            f"choose one of {sorted(spec.model_args)}"
        )
    args = copy.deepcopy(spec.model_args[flavor])
    args.update_from_config(job_config, tokenizer)
    with torch.device("meta"):
        model = spec.model_cls(args)
    return args, model
