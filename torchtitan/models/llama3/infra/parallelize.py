"""Apply the parallel stack to a Llama 3 model: TP(+SP, loss parallel) -> CP -> AC -> compile -> FSDP2/HSDP/DDP,
through the generic dense-decoder helpers with Llama's module names."""

from __future__ import annotations

import functools
from typing import Any

import torch.nn as nn
from torch.distributed.tensor.parallel import ParallelStyle

from torchtitan.distributed.context_parallel import apply_cp
from torchtitan.distributed.dense_parallelize import (
    DenseModuleNames,
    check_supported,
    dense_tp_plan,
    parallelize_dense,
)
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.tensor_parallel import PLAIN_TP_STYLES, LinearTPStyles
from torchtitan.models.attention import ScaledDotProductAttention

__all__ = ["LLAMA_MODULES", "check_supported", "llama_tp_plan", "parallelize_llama"]

LLAMA_MODULES = DenseModuleNames(
    embeddings="tok_embeddings",
    final_norm="norm",
    output="output",
    blocks="layers",
    attention="attention",
    attention_norm="attention_norm",
    wq="attention.wq",
    wk="attention.wk",
    wv="attention.wv",
    wo="attention.wo",
    feed_forward="feed_forward",
    ffn_norm="ffn_norm",
    w1="feed_forward.w1",
    w2="feed_forward.w2",
    w3="feed_forward.w3",
)


def llama_tp_plan(
    sequence_parallel: bool = True, loss_parallel: bool = True, styles: LinearTPStyles = PLAIN_TP_STYLES
) -> dict[str, ParallelStyle]:
    """The Llama tensor-parallel plan (see `dense_tp_plan`)."""
    return dense_tp_plan(LLAMA_MODULES, sequence_parallel, loss_parallel, styles)


def parallelize_llama(model: nn.Module, parallel_dims: ParallelDims, job_config: Any) -> nn.Module:
    """Apply TP, CP attention, activation checkpointing, per-block compile and data parallelism (see
    `parallelize_dense`)."""
    return parallelize_dense(
        model, parallel_dims, job_config, LLAMA_MODULES,
        apply_cp_fn=functools.partial(apply_cp, attention_cls=ScaledDotProductAttention),
    )
