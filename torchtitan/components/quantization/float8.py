"""`quantize.linear.float8`: Float8 training of nn.Linear layers through torchao.

Eligible nn.Linear layers become torchao `Float8Linear`s: their weights stay in high precision (so
checkpoints interchange with bf16/fp32 runs) and each matmul casts its operands to float8 on the fly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from torchtitan.components.quantization.utils import cuda_capability, require_capability, require_torchao
from torchtitan.config.errors import ConfigError
from torchtitan.distributed.tensor_parallel import PLAIN_TP_STYLES, LinearTPStyles
from torchtitan.protocols.model_converter import register_model_converter
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

FLOAT8 = "quantize.linear.float8"  # the converter's name and its config section
AUTO_FILTER = "auto_filter_small_kn"
MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with float8 tensor cores


def recipe_of(job_config: Any) -> str:
    """The float8 recipe the job asks for; unset means tensorwise."""
    return job_config.quantize.linear.float8.recipe_name or "tensorwise"


def _check_all_gather(cfg: Any, recipe: str, parallel_dims: Any) -> None:
    if cfg.enable_fsdp_float8_all_gather:
        if recipe != "tensorwise":
            raise ConfigError(
                f"{FLOAT8}.enable_fsdp_float8_all_gather=true needs recipe_name tensorwise (got {recipe}); "
                "fix: drop the flag or use the tensorwise recipe"
            )
        if parallel_dims is None or not parallel_dims.fsdp_enabled:
            raise ConfigError(
                f"{FLOAT8}.enable_fsdp_float8_all_gather=true needs FSDP sharding "
                "(data_parallel_shard_degree > 1); fix: drop the flag or shard"
            )
    elif cfg.precompute_float8_dynamic_scale_for_fsdp:
        raise ConfigError(
            f"{FLOAT8}.precompute_float8_dynamic_scale_for_fsdp=true only applies to the float8 all-gather; "
            f"fix: also set {FLOAT8}.enable_fsdp_float8_all_gather, or drop the flag"
        )


def _auto_filter(recipe: str, filter_fqns: list[str]) -> Callable[[nn.Module, str], bool]:
    """torchao's size-based filter for `recipe` (True: converting this Linear is expected to pay off)."""
    from torchao.float8.float8_linear_utils import _auto_filter_for_recipe

    try:
        return _auto_filter_for_recipe(recipe, filter_fqns)
    except NotImplementedError:
        raise ConfigError(
            f"{FLOAT8}.filter_fqns: {AUTO_FILTER} has no size thresholds for recipe {recipe}; "
            "fix: use the tensorwise or rowwise recipe, or list the FQNs to skip instead"
        ) from None


class Float8LinearConverter:
    """Swap nn.Linear layers for torchao Float8Linear; precompute FSDP float8 scales after each step."""

    def __init__(self, job_config: Any, parallel_dims: Any = None) -> None:
        require_torchao(FLOAT8)
        cfg = job_config.quantize.linear.float8
        capability = cuda_capability()
        if capability is not None and not cfg.emulate:
            require_capability(
                FLOAT8, capability, MIN_CAPABILITY,
                fix=f"set {FLOAT8}.emulate = true, or run on an SM 8.9+ GPU (Ada, Hopper, Blackwell)",
            )
        self.recipe = recipe_of(job_config)
        _check_all_gather(cfg, self.recipe, parallel_dims)
        self.precompute_scales = cfg.precompute_float8_dynamic_scale_for_fsdp
        # Without CUDA the matmuls are emulated: float8 gives no speedup on a CPU, and torch's CPU
        # `_scaled_mm` is a reference kernel (on AVX-512 Xeons hundreds of times slower than the
        # emulation). Both compute the same float8-rounded products, accumulated in fp32.
        self.emulate = cfg.emulate or capability is None
        self.filter_fqns = [f for f in cfg.filter_fqns if f != AUTO_FILTER]
        self.size_filter = _auto_filter(self.recipe, self.filter_fqns) if AUTO_FILTER in cfg.filter_fqns else None

        from torchao.float8 import Float8LinearConfig

        self.config = dataclasses.replace(
            Float8LinearConfig.from_recipe_name(self.recipe),
            emulate=self.emulate,
            enable_fsdp_float8_all_gather=cfg.enable_fsdp_float8_all_gather,
        )

    def skip_reason(self, fqn: str, linear: nn.Linear) -> str | None:
        """Why the Linear at `fqn` stays in high precision; None when it is converted."""
        if any(part in fqn for part in self.filter_fqns):
            return "filter_fqns"
        out_features, in_features = linear.weight.shape
        if out_features % 16 or in_features % 16:
            return "weight dims not divisible by 16"
        if self.size_filter is not None and not self.size_filter(linear, fqn):
            return AUTO_FILTER
        return None

    def convert(self, model: nn.Module) -> None:
        from torchao.float8 import convert_to_float8_training

        reasons = {fqn: self.skip_reason(fqn, m) for fqn, m in model.named_modules() if isinstance(m, nn.Linear)}
        convert_to_float8_training(
            model, config=self.config, module_filter_fn=lambda _, fqn: fqn in reasons and reasons[fqn] is None
        )
        skipped = [f"{fqn} ({why})" for fqn, why in reasons.items() if why is not None]
        converted = len(reasons) - len(skipped)
        mode = ", ".join([self.recipe] + ["emulated"] * self.emulate
                         + ["float8 FSDP all-gather"] * self.config.enable_fsdp_float8_all_gather)
        message = (
            f"Float8 training ({mode}): converted {converted} of {len(reasons)} Linear layers; "
            f"skipped {len(skipped)}: {', '.join(skipped) or 'none'}"
        )
        if converted:
            logger.info(message)
        else:
            logger.warning(message)

    def post_optimizer_hook(self, model: nn.Module | list[nn.Module]) -> None:
        """Compute the float8 scales of every FSDP-sharded weight in one all-reduce, after the optimizer step."""
        if not self.precompute_scales:
            return
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        for part in model if isinstance(model, list) else [model]:
            precompute_float8_dynamic_scale_for_fsdp(part)


def linear_tp_styles(job_config: Any, device_type: str) -> LinearTPStyles:
    """TP styles for the blocks' linear layers: torchao's float8 styles (float8 all-gathers) for a
    tensorwise float8 run on CUDA, the plain styles otherwise (they run on Float8Linear too)."""
    if FLOAT8 not in job_config.model.converters:
        return PLAIN_TP_STYLES
    recipe = recipe_of(job_config)
    if recipe != "tensorwise":  # torchao's float8 TP styles assume tensorwise scales
        return PLAIN_TP_STYLES
    if device_type != "cuda":
        logger.info(
            f"Float8 with TP on {device_type}: torchao's float8 TP styles need float8 collectives, which gloo "
            "lacks; using the plain TP styles on the Float8Linear modules"
        )
        return PLAIN_TP_STYLES
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    logger.info("Float8 with TP: torchao's float8 TP styles (float8 all-gathers)")
    return LinearTPStyles(Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput)


register_model_converter(Float8LinearConverter, FLOAT8)
