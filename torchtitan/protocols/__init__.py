"""Interfaces between the generic trainer and model families."""

from torchtitan.protocols.model import BaseModelArgs, ModelProtocol, dense_nparams_and_flops
from torchtitan.protocols.model_converter import (
    ModelConverter,
    ModelConvertersContainer,
    build_model_converters,
    register_model_converter,
)
from torchtitan.protocols.state_dict_adapter import StateDictAdapter
from torchtitan.protocols.train_spec import TrainSpec, build_meta_model, get_train_spec, register_train_spec

__all__ = [
    "BaseModelArgs",
    "ModelConverter",
    "ModelConvertersContainer",
    "ModelProtocol",
    "StateDictAdapter",
    "TrainSpec",
    "build_meta_model",
    "build_model_converters",
    "dense_nparams_and_flops",
    "get_train_spec",
    "register_model_converter",
    "register_train_spec",
]
