"""The training loss: summed token cross-entropy (the trainer divides by the global label-token count)."""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

__all__ = ["IGNORE_INDEX", "LossFunction", "TokenNormalizedLoss", "build_cross_entropy_loss", "cross_entropy_loss"]

IGNORE_INDEX = -100
LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the cross-entropy of `logits[B, S, V]` (computed in fp32) against `labels[B, S]`.

    Labels equal to -100 contribute nothing. `logits` may be a vocab-sharded DTensor inside
    `torch.distributed.tensor.parallel.loss_parallel()`.
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum", ignore_index=IGNORE_INDEX
    )


def build_cross_entropy_loss(job_config: Any) -> LossFunction:
    """`cross_entropy_loss`, wrapped in torch.compile when compile.enable and "loss" is in compile.components."""
    compile_config = job_config.compile
    if compile_config.enable and "loss" in compile_config.components:
        logger.info(f"Compiling the loss function with torch.compile (backend {compile_config.backend})")
        return torch.compile(cross_entropy_loss, backend=compile_config.backend)
    return cross_entropy_loss


class TokenNormalizedLoss:
    """A summed loss divided by the global number of label tokens of the current optimizer step.

    Built once, before the model is split, because a pipeline schedule calls it per microbatch; the trainer
    sets `global_tokens` at the start of every step. Summing these losses over microbatches, gradient
    accumulation steps, data-parallel and pipeline ranks gives exactly the one-batch, one-device mean.
    """

    def __init__(self, loss_fn: LossFunction) -> None:
        self.loss_fn = loss_fn
        self.global_tokens = 1

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, labels) / self.global_tokens
