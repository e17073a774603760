"""Apply the parallel stack to a Llama 3 model: TP(+SP, loss parallel) -> CP -> AC -> compile -> FSDP2/HSDP/DDP."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
)

from torchtitan.components.quantization.float8 import linear_tp_styles
from torchtitan.config.errors import ConfigError
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.compile import apply_compile, model_compile_enabled
from torchtitan.distributed.context_parallel import apply_cp, build_context_parallel
from torchtitan.distributed.data_parallel import apply_ddp, apply_fsdp
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models.attention import ScaledDotProductAttention
from torchtitan.distributed.tensor_parallel import (
    PLAIN_TP_STYLES,
    LinearTPStyles,
    ReplicateParallel,
    apply_tp_plan,
    check_async_tp,
    maybe_enable_async_tp,
)
from torchtitan.tools.logging import get_logger
from torchtitan.tools.utils import TORCH_DTYPES, resolve_mixed_precision_param

logger = get_logger(__name__)



def llama_tp_plan(
    sequence_parallel: bool = True, loss_parallel: bool = True, styles: LinearTPStyles = PLAIN_TP_STYLES
) -> dict[str, ParallelStyle]:
    """The Llama tensor-parallel plan: module path (`*` = every block) -> parallel style.

    Attention and FFN are Megatron-style column-then-row pairs. With sequence parallel the activations
    between them (embeddings out, norms, residual stream) are sharded on the sequence dim (Shard(1))
    and the row-parallel outputs are reduce-scattered; without it they are replicated. With loss
    parallel the logits stay sharded on the vocab dim for `loss_parallel()` cross entropy. `styles`
    shards the blocks' linear layers and their inputs (float8 styles under Float8 training).
    """
    seq = Shard(1) if sequence_parallel else Replicate()
    norm = SequenceParallel() if sequence_parallel else ReplicateParallel()
    plan: dict[str, ParallelStyle] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "norm": norm,
        "output": ColwiseParallel(
            input_layouts=seq,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
        "layers.*.attention_norm": norm,
        "layers.*.attention.wq": styles.colwise(),
        "layers.*.attention.wk": styles.colwise(),
        "layers.*.attention.wv": styles.colwise(),
        "layers.*.attention.wo": styles.rowwise(output_layouts=seq),
        "layers.*.ffn_norm": norm,
        "layers.*.feed_forward.w1": styles.colwise(),
        "layers.*.feed_forward.w2": styles.rowwise(output_layouts=seq),
        "layers.*.feed_forward.w3": styles.colwise(),
    }
    if sequence_parallel:
        # All-gather the sequence-sharded norm output once per sub-layer (freqs_cis passes through).
        plan["layers.*.attention"] = styles.prepare_input(
            input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)
        )
        plan["layers.*.feed_forward"] = styles.prepare_input(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        )
    return plan


def check_supported(parallel_dims: ParallelDims, job_config: Any) -> None:
    """One-line ConfigErrors for layouts this model's parallelize function does not implement."""
    if parallel_dims.dp_replicate_enabled and not parallel_dims.fsdp_enabled and parallel_dims.tp_enabled:
        raise ConfigError(
            f"--parallelism.data_parallel_replicate_degree={parallel_dims.dp_replicate} with "
            f"tensor_parallel_degree={parallel_dims.tp} needs data_parallel_shard_degree > 1 (HSDP); "
            "DDP only runs alone"
        )
    if job_config.training.enable_cpu_offload and not parallel_dims.fsdp_enabled:
        raise ConfigError(
            "--training.enable_cpu_offload needs FSDP (data_parallel_shard_degree > 1); drop the flag or shard"
        )


def _copy_if_view(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook: replace a view output (TP's `to_local()` of the embedding) by a copy.

    Under TP + SP a per-block compiled first block cannot take that view as input: its backward hands
    a plain tensor to DTensor's redistribute backward ("'Tensor' object has no attribute
    '_local_tensor'"). FSDP also warns about view outputs. The copy is one activation per step.
    """
    return output.clone() if output._is_view() else None


def parallelize_llama(model: nn.Module, parallel_dims: ParallelDims, job_config: Any) -> nn.Module:
    """Apply TP, CP attention, activation checkpointing, per-block compile and data parallelism, in that order.

    Works on a meta-device model (materialize with `to_empty` + `init_weights` afterwards) as well as
    on an initialized one (all ranks must then hold the same weights).
    """
    check_supported(parallel_dims, job_config)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    compile_model = model_compile_enabled(job_config.compile)

    # 1. TP first: it turns parameters into DTensors on the TP mesh, which FSDP later shards again
    #    over the data-parallel mesh; AC and compile then wrap the TP-annotated modules.
    if parallel_dims.tp_enabled:
        tp_mesh = parallel_dims.get_mesh("tp")
        maybe_enable_async_tp(job_config, tp_mesh)
        plan = llama_tp_plan(
            parallel_dims.sequence_parallel_enabled,
            parallel_dims.loss_parallel_enabled,
            linear_tp_styles(job_config, device_type),
        )
        apply_tp_plan(model, tp_mesh, plan)
        if model.tok_embeddings is not None:
            model.tok_embeddings.register_forward_hook(_copy_if_view)
        logger.info(
            f"Applied tensor parallel (degree {parallel_dims.tp}, sequence parallel "
            f"{parallel_dims.sequence_parallel_enabled}, loss parallel {parallel_dims.loss_parallel_enabled})"
        )
    elif job_config.parallelism.enable_async_tensor_parallel:
        check_async_tp(job_config, device_type)
        logger.warning("--parallelism.enable_async_tensor_parallel has no effect without tensor parallelism")

    # CP: context-parallel attention in every block (inputs and RoPE are sharded by the trainer).
    cp = build_context_parallel(parallel_dims, job_config, device_type)
    if cp is not None:
        apply_cp(model, cp, ScaledDotProductAttention)

    # 2. AC before compile, so each compiled block graph contains its checkpointed region.
    apply_ac(model, job_config.activation_checkpoint)

    # 3. Compile per block before data parallelism, so FSDP/DDP hooks run around the compiled graphs.
    if compile_model:
        apply_compile(model, job_config.compile)

    # 4. Data parallelism last: FSDP must see the final module structure to group parameters per block.
    training = job_config.training
    if parallel_dims.fsdp_enabled:
        apply_fsdp(
            model,
            parallel_dims.get_mesh(("dp_replicate", "dp_shard_cp")),
            param_dtype=TORCH_DTYPES[resolve_mixed_precision_param(training.mixed_precision_param, device_type)],
            reduce_dtype=TORCH_DTYPES[training.mixed_precision_reduce],
            pp_enabled=parallel_dims.pp_enabled,
            cpu_offload=training.enable_cpu_offload,
            reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
        )
    elif parallel_dims.dp_replicate_enabled:
        apply_ddp(model, parallel_dims.get_mesh("dp_replicate"), compile_enabled=compile_model)
    return model
