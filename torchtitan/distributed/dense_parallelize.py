"""The parallel stack of a dense decoder, for any model that names its modules in a `DenseModuleNames`:
TP(+SP, loss parallel) -> AC -> per-block compile -> FSDP2/HSDP/DDP. Our Llama and the transformers
modeling backend both go through `parallelize_dense`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel

from torchtitan.components.quantization.float8 import linear_tp_styles
from torchtitan.config.errors import ConfigError
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.compile import apply_compile, model_compile_enabled
from torchtitan.distributed.context_parallel import ContextParallel, build_context_parallel
from torchtitan.distributed.data_parallel import apply_ddp, apply_fsdp
from torchtitan.distributed.module_paths import resolve_module
from torchtitan.distributed.parallel_dims import ParallelDims
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


class DenseModuleNames(NamedTuple):
    """Dotted module paths of a dense decoder. `embeddings`, `final_norm`, `output` and `blocks` are
    relative to the model, the others to one block."""

    embeddings: str
    final_norm: str
    output: str
    blocks: str
    attention: str
    attention_norm: str
    wq: str
    wk: str
    wv: str
    wo: str
    feed_forward: str
    ffn_norm: str
    w1: str  # gate projection
    w2: str  # down projection
    w3: str  # up projection
    attention_input_kwarg: str | None = None  # the attention's hidden-states keyword; None: first positional arg
    head_norms: tuple[str, ...] = ()  # norms over head_dim of (batch, seq, heads, head_dim) projections (q/k norms)
    tied_output: bool = False  # the output head's weight is the embedding's (one parameter)


def dense_tp_plan(
    names: DenseModuleNames,
    sequence_parallel: bool = True,
    loss_parallel: bool = True,
    styles: LinearTPStyles = PLAIN_TP_STYLES,
    dtensor_residual: bool = False,
) -> dict[str, ParallelStyle]:
    """The tensor-parallel plan: module path (`*` = every block) -> parallel style.

    Attention and FFN are Megatron-style column-then-row pairs. With sequence parallel the activations
    between them (embeddings out, norms, residual stream) are sharded on the sequence dim (Shard(1))
    and the row-parallel outputs are reduce-scattered; without it they are replicated. With loss
    parallel the logits stay sharded on the vocab dim for `loss_parallel()` cross entropy. `styles`
    shards the blocks' linear layers and their inputs (float8 styles under Float8 training). Head
    norms see each rank's heads only, so they treat dim 2 as sharded (their weight gradients are summed).
    `dtensor_residual` (with sequence parallel) keeps the residual stream (embeddings and row-parallel
    outputs) a sequence-sharded DTensor, for models that read the full sequence length off their hidden
    states (transformers builds positions and masks from it).
    """
    seq = Shard(1) if sequence_parallel else Replicate()
    local = not (dtensor_residual and sequence_parallel)
    norm = SequenceParallel() if sequence_parallel else ReplicateParallel()
    block = f"{names.blocks}.*."
    plan: dict[str, ParallelStyle] = {
        names.embeddings: RowwiseParallel(input_layouts=Replicate(), output_layouts=seq, use_local_output=local),
        names.final_norm: norm,
        names.output: ColwiseParallel(
            input_layouts=seq,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
        block + names.attention_norm: norm,
        block + names.wq: styles.colwise(),
        block + names.wk: styles.colwise(),
        block + names.wv: styles.colwise(),
        block + names.wo: styles.rowwise(output_layouts=seq, use_local_output=local),
        block + names.ffn_norm: norm,
        block + names.w1: styles.colwise(),
        block + names.w2: styles.rowwise(output_layouts=seq, use_local_output=local),
        block + names.w3: styles.colwise(),
    }
    for head_norm in names.head_norms:
        plan[block + head_norm] = SequenceParallel(sequence_dim=2, use_local_output=True)
    if sequence_parallel:
        # All-gather the sequence-sharded norm output once per sub-layer (positions pass through).
        if names.attention_input_kwarg is None:
            attention_input = styles.prepare_input(
                input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)
            )
        else:
            kwarg = names.attention_input_kwarg
            attention_input = styles.prepare_input(
                input_kwarg_layouts={kwarg: Shard(1)}, desired_input_kwarg_layouts={kwarg: Replicate()}
            )
        plan[block + names.attention] = attention_input
        plan[block + names.feed_forward] = styles.prepare_input(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        )
    return plan


def check_supported(parallel_dims: ParallelDims, job_config: Any) -> None:
    """One-line ConfigErrors for layouts `parallelize_dense` does not implement."""
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


def _tie_output(model: nn.Module, names: DenseModuleNames) -> None:
    """Point the output head at the embedding's (now TP-distributed) weight again: TP replaced each
    module's parameter separately, and both are row-sharded (Shard(0)) the same way. (A model must also
    tie again after `to_empty`, which replaces parameters per module too.)"""
    embeddings, output = resolve_module(model, names.embeddings), resolve_module(model, names.output)
    if embeddings is not None and output is not None:
        output.weight = embeddings.weight


def parallelize_dense(
    model: nn.Module,
    parallel_dims: ParallelDims,
    job_config: Any,
    names: DenseModuleNames,
    apply_cp_fn: Callable[[nn.Module, ContextParallel], None] | None = None,
    dtensor_residual: bool = False,
) -> nn.Module:
    """Apply TP, CP attention, activation checkpointing, per-block compile and data parallelism, in that order.

    `apply_cp_fn(model, cp)` installs context-parallel attention in the model (e.g. `apply_cp` with the
    model's causal-attention class; None: the model does not support CP); `dtensor_residual`: see `dense_tp_plan`.

    Works on a meta-device model (materialize with `to_empty` + `init_weights` afterwards) as well as
    on an initialized one (all ranks must then hold the same weights). A tied output head stays one
    parameter: it is re-tied after TP and left with the embedding to FSDP's root group.
    """
    check_supported(parallel_dims, job_config)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    compile_model = model_compile_enabled(job_config.compile)

    # 1. TP first: it turns parameters into DTensors on the TP mesh, which FSDP later shards again
    #    over the data-parallel mesh; AC and compile then wrap the TP-annotated modules.
    if parallel_dims.tp_enabled:
        tp_mesh = parallel_dims.get_mesh("tp")
        maybe_enable_async_tp(job_config, tp_mesh)
        plan = dense_tp_plan(
            names,
            parallel_dims.sequence_parallel_enabled,
            parallel_dims.loss_parallel_enabled,
            linear_tp_styles(job_config, device_type),
            dtensor_residual,
        )
        apply_tp_plan(model, tp_mesh, plan)
        if names.tied_output:
            _tie_output(model, names)
        embeddings = resolve_module(model, names.embeddings)
        if embeddings is not None:
            embeddings.register_forward_hook(_copy_if_view)
        logger.info(
            f"Applied tensor parallel (degree {parallel_dims.tp}, sequence parallel "
            f"{parallel_dims.sequence_parallel_enabled}, loss parallel {parallel_dims.loss_parallel_enabled})"
        )
    elif job_config.parallelism.enable_async_tensor_parallel:
        check_async_tp(job_config, device_type)
        logger.warning("--parallelism.enable_async_tensor_parallel has no effect without tensor parallelism")

    # CP: context-parallel attention in every block (the trainer shards inputs, labels and RoPE positions).
    cp = build_context_parallel(parallel_dims, job_config, device_type)
    if cp is not None:
        if apply_cp_fn is None:
            raise ConfigError(
                f"--parallelism.context_parallel_degree={parallel_dims.cp}: model {job_config.model.name} "
                "does not support context parallelism yet; set it to 1"
            )
        apply_cp_fn(model, cp)

    # 2. AC before compile, so each compiled block graph contains its checkpointed region.
    apply_ac(model, job_config.activation_checkpoint, names.blocks)

    # 3. Compile per block before data parallelism, so FSDP/DDP hooks run around the compiled graphs.
    if compile_model:
        apply_compile(model, job_config.compile, names.blocks)

    # 4. Data parallelism last: FSDP must see the final module structure to group parameters per block.
    training = job_config.training
    if parallel_dims.fsdp_enabled:
        tied = names.tied_output
        apply_fsdp(
            model,
            parallel_dims.get_mesh(("dp_replicate", "dp_shard_cp")),
            param_dtype=TORCH_DTYPES[resolve_mixed_precision_param(training.mixed_precision_param, device_type)],
            reduce_dtype=TORCH_DTYPES[training.mixed_precision_reduce],
            pp_enabled=parallel_dims.pp_enabled,
            cpu_offload=training.enable_cpu_offload,
            reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
            blocks_path=names.blocks,
            first_modules=() if tied else (names.embeddings,),
            last_modules=(names.final_norm,) if tied else (names.final_norm, names.output),
        )
    elif parallel_dims.dp_replicate_enabled:
        apply_ddp(
            model, parallel_dims.get_mesh("dp_replicate"), compile_enabled=compile_model,
            pp_enabled=parallel_dims.pp_enabled,
        )
    return model
