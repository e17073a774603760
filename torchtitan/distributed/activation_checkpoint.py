"""Activation checkpointing per transformer block: none, full, every Nth block, or op-level selective."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from torchtitan.config.errors import ConfigError
from torchtitan.distributed.module_paths import block_container
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

_aten = torch.ops.aten
# Outputs kept by op-level SAC: matmuls and attention (expensive to recompute, cheap to store
# relative to the elementwise ops around them) and reduce-scatter (a collective: recomputing it would
# mean communicating again). Attention is listed for every backend, the CPU kernel included.
_OP_SAVE_LIST = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_mm.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}


def _op_sac_policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if func in _OP_SAVE_LIST else CheckpointPolicy.PREFER_RECOMPUTE


def _op_sac_context() -> Any:
    return create_selective_checkpoint_contexts(_op_sac_policy)


def _wrapper(ac_config: Any) -> Callable[[nn.Module], nn.Module]:
    return partial(checkpoint_wrapper, preserve_rng_state=getattr(ac_config, "preserve_rng_state", True))


def ac_block_filter(ac_config: Any, n_blocks: int) -> list[bool] | None:
    """Which blocks get (full-block) checkpointing; None for op-level SAC. Validates the option."""
    mode = ac_config.mode
    if mode == "none":
        return [False] * n_blocks
    if mode == "full":
        return [True] * n_blocks
    if mode != "selective":
        raise ConfigError(f"--activation_checkpoint.mode={mode!r} is invalid; use none, full or selective")
    option = str(ac_config.selective_ac_option)
    if option == "op":
        return None
    if not option.isdigit() or int(option) < 1:
        raise ConfigError(
            f"--activation_checkpoint.selective_ac_option={option!r} is invalid; "
            "use a positive integer N (checkpoint every Nth block) or 'op'"
        )
    every = int(option)
    return [(i + 1) % every == 0 for i in range(n_blocks)]


def apply_ac(model: nn.Module, ac_config: Any, blocks_path: str = "layers") -> None:
    """Wrap the blocks in the container at dotted `blocks_path` (ModuleDict or ModuleList) per `ac_config`
    (mode, selective_ac_option).

    Parameter FQNs gain `_checkpoint_wrapped_module.`; state_dict() and DCP strip it again.
    """
    blocks = block_container(model, blocks_path)
    chosen = ac_block_filter(ac_config, len(blocks))
    wrap = _wrapper(ac_config)
    for i, (name, block) in enumerate(list(blocks.named_children())):
        if chosen is None:
            blocks.register_module(name, wrap(block, context_fn=_op_sac_context))
        elif chosen[i]:
            blocks.register_module(name, wrap(block))
    if ac_config.mode != "none":
        option = "" if ac_config.mode == "full" else f" ({ac_config.selective_ac_option})"
        logger.info(f"Applied {ac_config.mode}{option} activation checkpointing")


def compile_target(block: nn.Module) -> nn.Module:
    """The module to compile for `block`: for a full-block checkpoint the block inside the wrapper, so the
    checkpoint runs around the compiled graph. (Traced by dynamo, such a checkpoint saves the TP
    DeviceMesh for backward in torch 2.13, which AOT autograd rejects.) Op-level SAC stays inside the
    graph: its policy must see the ops."""
    if isinstance(block, CheckpointWrapper) and "context_fn" not in block.checkpoint_fn.keywords:
        return block._checkpoint_wrapped_module
    return block
