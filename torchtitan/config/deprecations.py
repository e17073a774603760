"""Older torchtitan (0.1 and before) config names, mapped to the current ones with a one-line warning."""

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)


def _tokenizer_folder(path: str) -> str:
    # 0.1 pointed at the tokenizer file itself; hf_assets_path is the folder holding it.
    if os.path.isfile(path) or os.path.splitext(path)[1] in (".model", ".json"):
        return os.path.dirname(path) or "."
    return path


@dataclass(frozen=True)
class Alias:
    """Where an old key went: `new_key` (None: removed, value ignored) and an optional value transform."""

    old_key: str
    new_key: str | None
    transform: Callable[[Any], Any] | None = None
    note: str = ""

    def warn(self, where: str, value: Any = None) -> None:
        """Log the one-line deprecation warning naming the replacement."""
        if self.new_key is None:
            logger.warning(f"config key '{self.old_key}' ({where}) was removed and is ignored: {self.note}")
            return
        extra = ""
        if self.transform is not None and value is not None:
            extra = f" = {self.transform(value)!r}"
        logger.warning(
            f"config key '{self.old_key}' ({where}) is deprecated; use '{self.new_key}'{extra} instead{self.note}"
        )


_PARALLELISM_MOVED = {
    "training": (
        "data_parallel_replicate_degree",
        "data_parallel_shard_degree",
        "tensor_parallel_degree",
        "enable_async_tensor_parallel",
        "disable_loss_parallel",
        "enable_compiled_autograd",
    ),
    "experimental": (
        "pipeline_parallel_degree",
        "pipeline_parallel_schedule",
        "pipeline_parallel_schedule_csv",
        "context_parallel_degree",
        "context_parallel_rotate_method",
    ),
}

RENAMED_KEYS: dict[str, Alias] = {
    a.old_key: a
    for a in [
        Alias("checkpoint.enable_checkpoint", "checkpoint.enable"),
        Alias("checkpoint.model_weights_only", "checkpoint.last_save_model_only"),
        Alias("checkpoint.last_save_model_weights_only", "checkpoint.last_save_model_only"),
        Alias("checkpoint.initial_load_model_weights_only", "checkpoint.initial_load_model_only"),
        Alias("lr_scheduler.lr_min", "lr_scheduler.min_lr_factor"),
        Alias("job.print_args", "job.print_config"),
        Alias("training.compile", "compile.enable"),
        Alias("model.tokenizer_path", "model.hf_assets_path", _tokenizer_folder, " (the tokenizer's folder)"),
        Alias("training.batch_size", "training.local_batch_size"),
        Alias("training.seed", "debug.seed"),
        Alias("training.deterministic", "debug.deterministic"),
        Alias("training.warmup_steps", "lr_scheduler.warmup_steps"),
        Alias("experimental.custom_args_module", "job.custom_config_module"),
        *(Alias(f"{old}.{name}", f"parallelism.{name}") for old, names in _PARALLELISM_MOVED.items() for name in names),
        Alias("job.use_for_integration_test", None, note="it had no effect on training"),
        Alias("model.norm_type", None, note="models always use RMSNorm"),
        Alias("float8.force_recompute_fp8_weight_in_bwd", None, note="torchao no longer needs it"),
    ]
}

RENAMED_SECTIONS = {"float8": "quantize.linear.float8", "mx": "quantize.linear.mx"}
RENAMED_CONVERTERS = {"float8": "quantize.linear.float8", "mx": "quantize.linear.mx"}


def find_alias(key: str) -> Alias | None:
    """The alias for an old dotted key (renamed key or key in a renamed section), or None."""
    if key in RENAMED_KEYS:
        return RENAMED_KEYS[key]
    section, _, name = key.rpartition(".")
    if section in RENAMED_SECTIONS:
        return Alias(
            key,
            f"{RENAMED_SECTIONS[section]}.{name}",
            note=f" (section [{section}] is now [{RENAMED_SECTIONS[section]}])",
        )
    return None


def rename_converters(converters: list[str], where: str) -> list[str]:
    """Map 0.1 converter names (float8, mx) to the current ones, warning once per renamed name."""
    out = []
    for name in converters:
        if name in RENAMED_CONVERTERS:
            new = RENAMED_CONVERTERS[name]
            logger.warning(f"model.converters entry '{name}' ({where}) is deprecated; use '{new}' instead")
            name = new
        out.append(name)
    return out
