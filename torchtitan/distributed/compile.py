"""Per-block torch.compile, usable by any model whose repeated blocks live in one ModuleDict or ModuleList."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from torchtitan.distributed.activation_checkpoint import compile_target
from torchtitan.distributed.module_paths import block_container
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)


def model_compile_enabled(compile_config: Any) -> bool:
    """True when `compile.enable` is set and "model" is among `compile.components`."""
    return bool(compile_config.enable) and "model" in compile_config.components


def apply_compile(model: nn.Module, compile_config: Any, blocks_path: str = "layers") -> None:
    """Compile each block separately (fullgraph): all blocks share one compiled graph, so compile time
    stays that of one block, and FSDP hooks stay outside the graphs.

    Blocks are compiled in place (`nn.Module.compile`), so parameter FQNs do not change.
    """
    blocks = block_container(model, blocks_path)
    # A block may set module-level state and restore it before returning (transformers' hub-kernel dispatch
    # does, in every attention forward). Inside an activation-checkpointed region dynamo refuses such a
    # mutation unless the backward's recompute need not replay it, which holds for state restored on exit.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in blocks.children():
        compile_target(block).compile(backend=compile_config.backend, fullgraph=True)
    logger.info(f"Compiled each of the {len(blocks)} blocks with backend {compile_config.backend!r}")


def disable_compile_caches_for_tp(compile_config: Any, tp_enabled: bool) -> None:
    """Turn off inductor's on-disk graph caches when compiled graphs hold TP collectives.

    Those caches key a graph by its code, not by the process-group names its collectives carry, so a
    graph cached by a run with another layout replays here naming a group this run does not have
    ("Could not resolve the process group registered under the name ..."). Such graphs are compiled
    fresh instead; runs without TP keep the caches.
    """
    if compile_config.enable and tp_enabled:
        torch._inductor.config.force_disable_caches = True
        logger.info("Inductor caches disabled: compiled graphs hold tensor-parallel collectives")
