"""One optimizer per model part behind a single Optimizer-like, checkpointable object."""

import functools
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.optim import Optimizer
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from torchtitan.config import ConfigError
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

__all__ = ["OptimizersContainer", "build_optimizers"]

_OPTIMIZERS: dict[str, type[Optimizer]] = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
_IMPLEMENTATIONS: dict[str, dict[str, bool]] = {
    "for-loop": {"fused": False, "foreach": False},
    "foreach": {"fused": False, "foreach": True},
    "fused": {"fused": True, "foreach": False},
}


class OptimizersContainer(Optimizer, Stateful):
    """Holds `optimizer_cls(part.parameters(), **optimizer_kwargs)` for each model part.

    `step()` / `zero_grad()` act on all of them, and Optimizer step hooks registered on the container run
    once per container step. `param_groups` is the concatenation of the parts' groups (the same dicts),
    so changing an lr there changes it in the real optimizer. The state dict is the parts' flattened
    DCP optimizer state dicts (keys are parameter FQNs), merged, so it reshards across parallel layouts.
    """

    def __init__(
        self, model_parts: list[nn.Module], optimizer_cls: type[Optimizer], optimizer_kwargs: dict[str, Any]
    ) -> None:
        self.model_parts = model_parts
        self.optimizers = [optimizer_cls(part.parameters(), **optimizer_kwargs) for part in model_parts]
        # Optimizer.__init__ sets up the hook machinery; the groups it builds are replaced by the real ones.
        all_params = [p for part in model_parts for p in part.parameters()]
        Optimizer.__init__(self, all_params, optimizer_kwargs)
        self.param_groups = [group for opt in self.optimizers for group in opt.param_groups]
        self._options = StateDictOptions(flatten_optimizer_state_dict=True)

    def __iter__(self):
        return iter(self.optimizers)

    def __len__(self) -> int:
        return len(self.optimizers)

    def step(self, *args: Any, **kwargs: Any) -> None:
        for opt in self.optimizers:
            opt.step(*args, **kwargs)

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        for opt in self.optimizers:
            opt.zero_grad(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        get = functools.partial(get_optimizer_state_dict, options=self._options)
        return {k: v for sd in map(get, self.model_parts, self.optimizers) for k, v in sd.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Each part picks its own parameters' entries out of the merged flat dict.
        for part, opt in zip(self.model_parts, self.optimizers):
            set_optimizer_state_dict(part, opt, optim_state_dict=state_dict, options=self._options)


def _fused_supported(model_parts: list[nn.Module]) -> bool:
    supported = _get_fused_kernels_supported_devices()
    return all(
        p.device.type in supported and p.is_floating_point() for part in model_parts for p in part.parameters()
    )


def build_optimizers(
    model_parts: list[nn.Module], optimizer_config: Any, parallel_dims: Any = None
) -> OptimizersContainer:
    """Build the configured Adam/AdamW over every model part (`parallel_dims` is accepted for the TrainSpec
    signature; the optimizer itself is layout agnostic because DTensor parameters carry their sharding)."""
    name = optimizer_config.name
    if name not in _OPTIMIZERS:
        raise ConfigError(f"optimizer.name={name!r} is not supported: use one of {', '.join(_OPTIMIZERS)}")
    impl = optimizer_config.implementation
    if impl not in _IMPLEMENTATIONS:
        raise ConfigError(
            f"optimizer.implementation={impl!r} is not supported: use one of {', '.join(_IMPLEMENTATIONS)}"
        )
    flags = dict(_IMPLEMENTATIONS[impl])
    if flags["fused"] and not _fused_supported(model_parts):
        devices = sorted({p.device.type for part in model_parts for p in part.parameters()})
        logger.warning(
            f"optimizer.implementation='fused' is not available for parameters on {devices}; using 'foreach'"
        )
        flags = dict(_IMPLEMENTATIONS["foreach"])
    kwargs = {
        "lr": optimizer_config.lr,
        "betas": (optimizer_config.beta1, optimizer_config.beta2),
        "eps": optimizer_config.eps,
        "weight_decay": optimizer_config.weight_decay,
        **flags,
    }
    return OptimizersContainer(model_parts, _OPTIMIZERS[name], kwargs)
