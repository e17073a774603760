"""Warmup-stable-decay learning-rate schedule: one LambdaLR per optimizer, checkpointable as one."""

import copy
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

from torch.distributed.checkpoint.stateful import Stateful
from torch.optim.lr_scheduler import LambdaLR

from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config import ConfigError
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

__all__ = ["LRSchedulersContainer", "build_lr_schedulers", "lr_factor", "schedule_phases"]

DECAY_TYPES = ("linear", "sqrt", "cosine")


def _bad_decay_type(decay_type: str) -> ConfigError:
    return ConfigError(f"lr_scheduler.decay_type={decay_type!r} is not supported: use one of {', '.join(DECAY_TYPES)}")


def lr_factor(
    step: int, warmup_steps: int, stable_steps: int, decay_steps: int, decay_type: str, min_lr_factor: float
) -> float:
    """Multiplier of the base lr at 0-based scheduler step `step` (training step `step + 1` uses it).

    Warmup: (step+1)/warmup_steps for step < warmup_steps. Stable: 1.0 for the next `stable_steps`.
    Decay: progress p = (step + 1 - warmup_steps - stable_steps) / decay_steps (clamped to [0, 1]),
    curve 1-p (linear), 1-sqrt(p) (sqrt) or (1+cos(pi p))/2 (cosine), result min + (1-min) * curve.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = warmup_steps + stable_steps
    if step < decay_start or decay_steps == 0:
        return 1.0
    p = min(1.0, (step + 1 - decay_start) / decay_steps)
    if decay_type == "linear":
        curve = 1.0 - p
    elif decay_type == "sqrt":
        curve = 1.0 - math.sqrt(p)
    elif decay_type == "cosine":
        curve = 0.5 * (1.0 + math.cos(math.pi * p))
    else:
        raise _bad_decay_type(decay_type)
    return min_lr_factor + (1.0 - min_lr_factor) * curve


def schedule_phases(total_steps: int, warmup_steps: int, decay_ratio: float | None) -> tuple[int, int, int]:
    """(warmup_steps, stable_steps, decay_steps) for `lr_factor` over a run of `total_steps` steps.

    Warmup is capped at the run length; decay covers round(decay_ratio * total_steps) steps (all steps after
    warmup when decay_ratio is None), capped to what warmup leaves. As in torchtitan, the schedule has one
    virtual step past the end, so the last training step's lr is still above the minimum.
    """
    if warmup_steps > total_steps:
        logger.warning(
            f"lr_scheduler.warmup_steps={warmup_steps} exceeds the {total_steps} total steps; using {total_steps}"
        )
        warmup_steps = total_steps
    if decay_ratio is None:
        decay_steps = total_steps - warmup_steps
    else:
        decay_steps = round(total_steps * decay_ratio)
        if warmup_steps + decay_steps > total_steps:
            logger.warning(
                f"lr_scheduler warmup ({warmup_steps}) + decay ({decay_steps}) steps exceed the {total_steps} "
                f"total steps; decaying over {total_steps - warmup_steps} steps"
            )
            decay_steps = total_steps - warmup_steps
    stable_steps = total_steps + 1 - warmup_steps - decay_steps
    return warmup_steps, stable_steps, decay_steps


class LRSchedulersContainer(Stateful):
    """A LambdaLR with `lr_lambda` on each optimizer of the container, stepped together.

    All schedulers are identical, so the state dict is the first one's and loads into all of them; that
    keeps it independent of how many model parts (pipeline stages) the run has.
    """

    def __init__(self, optimizers: OptimizersContainer, lr_lambda: Callable[[int], float]) -> None:
        if len(optimizers) == 0:
            raise ValueError("LRSchedulersContainer needs at least one optimizer")
        self.schedulers = [LambdaLR(opt, lr_lambda) for opt in optimizers]

    def __iter__(self) -> Iterator[LambdaLR]:
        return iter(self.schedulers)

    def __len__(self) -> int:
        return len(self.schedulers)

    def step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def last_lr(self) -> float:
        """The current lr of the first parameter group."""
        return self.schedulers[0].get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return self.schedulers[0].state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for scheduler in self.schedulers:
            scheduler.load_state_dict(copy.deepcopy(state_dict))


def build_lr_schedulers(
    optimizers: OptimizersContainer, lr_scheduler_config: Any, training_steps: int
) -> LRSchedulersContainer:
    """Warmup-stable-decay schedulers over `lr_scheduler.total_steps` steps (None: `training_steps`)."""
    cfg = lr_scheduler_config
    if cfg.decay_type not in DECAY_TYPES:
        raise _bad_decay_type(cfg.decay_type)
    if cfg.decay_ratio is not None and not 0.0 <= cfg.decay_ratio <= 1.0:
        raise ConfigError(
            f"lr_scheduler.decay_ratio={cfg.decay_ratio} must be in [0, 1] (or unset to decay after warmup)"
        )
    if not 0.0 <= cfg.min_lr_factor <= 1.0:
        raise ConfigError(f"lr_scheduler.min_lr_factor={cfg.min_lr_factor} must be in [0, 1]")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"lr_scheduler.warmup_steps={cfg.warmup_steps} must be >= 0")
    total_steps = cfg.total_steps if cfg.total_steps is not None else training_steps
    warmup, stable, decay = schedule_phases(total_steps, int(cfg.warmup_steps), cfg.decay_ratio)
    lr_lambda = functools.partial(
        lr_factor,
        warmup_steps=warmup,
        stable_steps=stable,
        decay_steps=decay,
        decay_type=cfg.decay_type,
        min_lr_factor=cfg.min_lr_factor,
    )
    return LRSchedulersContainer(optimizers, lr_lambda)
