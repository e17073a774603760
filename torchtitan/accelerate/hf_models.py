"""Our parallel stack on a Hugging Face transformers causal LM of the families the transformers modeling
backend supports (Llama, Mistral, Qwen2, Qwen3): the backend's module names through the generic
`parallelize_dense` (TP(+SP) -> activation checkpointing -> per-block compile -> FSDP2/HSDP/DDP).

Two differences from the backend's own training: the user's loop computes the loss from full logits (the
Accelerator turns loss parallel off, so `lm_head` returns replicated logits), and transformers reads the
sequence length off the hidden states to build positions and masks, so under sequence parallel the residual
stream stays a sequence-sharded DTensor (`dtensor_residual`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

from torchtitan.config.errors import ConfigError
from torchtitan.distributed.dense_parallelize import parallelize_dense
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.module_paths import resolve_module
from torchtitan.experiments.transformers_modeling_backend.infra.parallelize import HF_MODULES, hf_module_names
from torchtitan.experiments.transformers_modeling_backend.model.args import SUPPORTED_ARCHITECTURES


def is_hf_causal_lm(model: nn.Module) -> bool:
    """True for a transformers causal LM with the backend's layout (`model.embed_tokens`, `model.layers`,
    `model.norm`, `lm_head`); only the supported architectures get TP."""
    if not hasattr(getattr(model, "config", None), "model_type"):
        return False
    paths = (HF_MODULES.embeddings, HF_MODULES.blocks, HF_MODULES.final_norm, HF_MODULES.output)
    try:
        return all(resolve_module(model, path) is not None for path in paths)
    except AttributeError:
        return False


def _check_tp(model: nn.Module, tp: int) -> None:
    config = model.config
    if type(model).__name__ not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"parallelism.tensor_parallel_degree={tp}: no tensor-parallel plan for {type(model).__name__} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); use data parallelism only"
        )
    for attr in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, attr, None) or config.num_attention_heads
        if heads % tp:
            raise ConfigError(
                f"parallelism.tensor_parallel_degree={tp} must divide the model's {attr}={heads}; "
                f"pick a divisor of {heads}"
            )


def fsdp_config(job_config: Any, param_dtype: Any, reduce_dtype: Any) -> dict[str, Any]:
    """fully_shard keyword arguments: mixed precision, and CPU offload when training.enable_cpu_offload."""
    config: dict[str, Any] = {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)}
    if job_config.training.enable_cpu_offload:
        config["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.accelerator.is_available())
    return config


def _sequence_check(tp: int) -> Any:
    """Forward pre-hook: sequence parallel needs sequence lengths divisible by the TP degree (every TP
    rank sees the same batch, so all of them raise alike instead of hanging in a collective)."""

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is not None and tokens.shape[1] % tp:
            raise ConfigError(
                f"sequence length {tokens.shape[1]} is not divisible by tensor_parallel_degree={tp} "
                "(sequence parallel); pad batches to a multiple of it or set parallelism.sequence_parallel: false"
            )

    return check


def parallelize_hf_model(model: nn.Module, parallel_dims: ParallelDims, job_config: Any) -> nn.Module:
    """Apply TP(+SP), AC, per-block compile and FSDP2/HSDP/DDP to an initialized transformers causal LM
    (mixed precision from `job_config.training`; loss parallel must be off in `parallel_dims`).

    All ranks must hold the same weights. Gradients are summed over data-parallel ranks (as in the trainer);
    the Accelerator divides the loss accordingly. The KV cache is switched off (`config.use_cache`): training
    does not use it, and its cache objects break per-layer `torch.compile(fullgraph=True)`.
    """
    model.config.use_cache = False
    if parallel_dims.tp_enabled:
        _check_tp(model, parallel_dims.tp)
        if parallel_dims.sequence_parallel_enabled:
            model.register_forward_pre_hook(_sequence_check(parallel_dims.tp), with_kwargs=True)
    return parallelize_dense(model, parallel_dims, job_config, hf_module_names(model), dtensor_residual=True)
