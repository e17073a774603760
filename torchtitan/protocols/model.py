"""What every model family provides: an args dataclass and a module built from it."""

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class BaseModelArgs:
    """Base of every model's hyper-parameter dataclass (one instance per flavor)."""

    def update_from_config(self, job_config: Any, tokenizer: Any = None) -> None:
        """Fill in what depends on the job (sequence length, vocabulary size); raise ConfigError on
        combinations the model cannot support."""
        raise NotImplementedError(f"{type(self).__name__} must implement update_from_config")

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """Return (number of parameters, training FLOPs per token) of `model` at `seq_len`."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_nparams_and_flops")

    def tp_head_counts(self) -> dict[str, int]:
        """{name: count} of the head dimensions tensor parallelism splits (e.g. query and key/value heads),
        which the TP degree must divide; empty for a model without attention heads."""
        return {}


@runtime_checkable
class ModelProtocol(Protocol):
    """A model built from its args on the meta device and materialized by `init_weights`."""

    def __init__(self, model_args: BaseModelArgs) -> None: ...

    def init_weights(self, buffer_device: torch.device | None = None) -> None: ...


def dense_nparams_and_flops(
    model: nn.Module, n_layers: int, n_heads: int, head_dim: int, seq_len: int
) -> tuple[int, int]:
    """Parameter count and FLOPs per token of a dense decoder (torchtitan's convention).

    FLOPs per token = 6 * (params - embedding params) for the matmuls of forward + backward, plus
    12 * n_layers * n_heads * head_dim * seq_len for the attention scores and weighted sum.
    """
    nparams = sum(p.numel() for p in model.parameters())
    nparams_embedding = sum(
        p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    )
    flops = 6 * (nparams - nparams_embedding) + 12 * n_layers * n_heads * head_dim * seq_len
    return nparams, flops
