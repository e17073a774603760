"""Our parallel stack on a Hugging Face transformers causal LM of the Llama family (Llama, Mistral, Qwen2):
TP(+SP) -> activation checkpointing -> per-block compile -> FSDP2/HSDP/DDP.

The TP plan is keyed by the transformers module names (`model.layers.*.self_attn.q_proj`, ...). It is
kept here until the transformers modeling backend ships its own plan for these families; then
`hf_tp_plan` should be replaced by that one (see docs/api.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from torchtitan.config.errors import ConfigError
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.compile import model_compile_enabled
from torchtitan.distributed.data_parallel import apply_ddp, disable_fsdp_gradient_division
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.tensor_parallel import ReplicateParallel, apply_tp_plan
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

# transformers `model_type`s whose decoder layers match the plan below (no per-head q/k norms).
TP_MODEL_TYPES = ("llama", "mistral", "qwen2")


def is_hf_causal_lm(model: nn.Module) -> bool:
    """True for a transformers causal LM with the `model.layers` / `lm_head` layout."""
    inner = getattr(model, "model", None)
    return hasattr(getattr(model, "config", None), "model_type") and hasattr(inner, "layers")


def hf_tp_plan(sequence_parallel: bool = True) -> dict[str, ParallelStyle]:
    """Module path -> style for a Llama-family transformers causal LM.

    Attention and MLP are column-then-row pairs. With sequence parallel, the residual stream and norms
    are sharded on the sequence dim (Shard(1)) and kept as DTensors, so the model still sees the full
    sequence length when it builds positions and masks; the final norm hands local shards to lm_head,
    whose output is gathered to full (replicated) logits for the model's own loss.
    """
    seq = Shard(1) if sequence_parallel else Replicate()
    norm = SequenceParallel() if sequence_parallel else ReplicateParallel()
    plan: dict[str, ParallelStyle] = {
        "model.embed_tokens": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=seq, use_local_output=not sequence_parallel
        ),
        "model.norm": SequenceParallel(use_local_output=True) if sequence_parallel else norm,
        "lm_head": ColwiseParallel(input_layouts=seq, output_layouts=Replicate()),
        "model.layers.*.input_layernorm": norm,
        "model.layers.*.post_attention_layernorm": norm,
        "model.layers.*.self_attn.q_proj": ColwiseParallel(),
        "model.layers.*.self_attn.k_proj": ColwiseParallel(),
        "model.layers.*.self_attn.v_proj": ColwiseParallel(),
        "model.layers.*.self_attn.o_proj": RowwiseParallel(
            output_layouts=seq, use_local_output=not sequence_parallel
        ),
        "model.layers.*.mlp.gate_proj": ColwiseParallel(),
        "model.layers.*.mlp.up_proj": ColwiseParallel(),
        "model.layers.*.mlp.down_proj": RowwiseParallel(
            output_layouts=seq, use_local_output=not sequence_parallel
        ),
    }
    if sequence_parallel:
        plan["model.layers.*.self_attn"] = PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
            use_local_output=True,
        )
        plan["model.layers.*.mlp"] = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        )
    return plan


def _check_tp(model: nn.Module, tp: int) -> None:
    config = model.config
    if config.model_type not in TP_MODEL_TYPES:
        raise ConfigError(
            f"parallelism.tensor_parallel_degree={tp}: no tensor-parallel plan for transformers model_type "
            f"{config.model_type!r} (supported: {', '.join(TP_MODEL_TYPES)}); use data parallelism only"
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


def parallelize_hf_model(
    model: nn.Module, parallel_dims: ParallelDims, job_config: Any, param_dtype: Any, reduce_dtype: Any
) -> nn.Module:
    """Apply TP(+SP), AC, per-block compile and FSDP2/HSDP/DDP to an initialized transformers causal LM.

    All ranks must hold the same weights. Gradients are summed over data-parallel ranks (as in the trainer);
    the Accelerator divides the loss accordingly.
    """
    if parallel_dims.tp_enabled:
        _check_tp(model, parallel_dims.tp)
        apply_tp_plan(model, parallel_dims.get_mesh("tp"), hf_tp_plan(parallel_dims.sequence_parallel_enabled))
        if parallel_dims.sequence_parallel_enabled:
            model.register_forward_pre_hook(_sequence_check(parallel_dims.tp), with_kwargs=True)
        logger.info(
            f"Applied tensor parallel to {type(model).__name__} (degree {parallel_dims.tp}, "
            f"sequence parallel {parallel_dims.sequence_parallel_enabled})"
        )
    blocks: nn.ModuleList = model.model.layers
    apply_ac(model.model, job_config.activation_checkpoint)
    compile_model = model_compile_enabled(job_config.compile)
    if compile_model:
        for block in blocks:
            block.compile(backend=job_config.compile.backend)
        logger.info(f"Compiled each of the {len(blocks)} blocks with backend {job_config.compile.backend!r}")
    if parallel_dims.fsdp_enabled:
        mesh = parallel_dims.get_mesh(("dp_replicate", "dp_shard_cp"))
        config = fsdp_config(job_config, param_dtype, reduce_dtype)
        for block in blocks:
            fully_shard(block, mesh=mesh, **config)
        fully_shard(model, mesh=mesh, **config)
        disable_fsdp_gradient_division(model)
        logger.info(f"Applied {'HSDP' if mesh.ndim == 2 else 'FSDP'} to {type(model).__name__}")
    elif parallel_dims.dp_replicate_enabled:
        if parallel_dims.tp_enabled:
            raise ConfigError(
                "parallelism.data_parallel_replicate_degree > 1 with tensor parallel needs "
                "data_parallel_shard_degree > 1 (HSDP); DDP only runs alone"
            )
        apply_ddp(model, parallel_dims.get_mesh("dp_replicate"), compile_enabled=compile_model)
    return model
