"""Value and cross-field checks of a resolved JobConfig that need no process group."""

from collections.abc import Callable
from functools import reduce
from typing import Any

from torchtitan.config.deprecations import rename_converters
from torchtitan.config.errors import ConfigError
from torchtitan.config.job_config import JobConfig
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

Rule = tuple[Callable[[Any], bool], str]


def _at_least(n: int) -> Rule:
    return (lambda v: v >= n, f"a value >= {n}")


def _positive() -> Rule:
    return (lambda v: v > 0, "a value > 0")


def _unit(upper_open: bool = False) -> Rule:
    if upper_open:
        return (lambda v: 0 <= v < 1, "a value in [0, 1)")
    return (lambda v: 0 <= v <= 1, "a value in [0, 1]")


def _optional(rule: Rule) -> Rule:
    pred, text = rule
    return (lambda v: v is None or pred(v), f"None or {text}")


def _minus_one_or_at_least_one(meaning: str) -> Rule:
    return (lambda v: v == -1 or v >= 1, f"-1 ({meaning}) or a value >= 1")


_RULES: dict[str, Rule] = {
    "training.local_batch_size": _at_least(1),
    "training.seq_len": _at_least(1),
    "training.steps": _at_least(1),
    "training.max_norm": _positive(),
    "training.gc_freq": _at_least(1),
    "training.shuffle_seed": _optional(_at_least(0)),
    "training.dataloader.num_workers": _at_least(0),
    "training.dataloader.prefetch_factor": _optional(_at_least(1)),
    "lr_scheduler.warmup_steps": _at_least(0),
    "lr_scheduler.total_steps": _optional(_at_least(1)),
    "lr_scheduler.decay_ratio": _optional(_unit()),
    "lr_scheduler.min_lr_factor": _unit(),
    "optimizer.lr": _at_least(0),
    "optimizer.beta1": _unit(upper_open=True),
    "optimizer.beta2": _unit(upper_open=True),
    "optimizer.eps": _positive(),
    "optimizer.weight_decay": _at_least(0),
    "parallelism.data_parallel_replicate_degree": _at_least(1),
    "parallelism.data_parallel_shard_degree": _minus_one_or_at_least_one("use the remaining ranks"),
    "parallelism.tensor_parallel_degree": _at_least(1),
    "parallelism.pipeline_parallel_degree": _at_least(1),
    "parallelism.context_parallel_degree": _at_least(1),
    "parallelism.context_parallel_load_balancer": (
        lambda v: v is None or str(v).lower() in ("headtail", "none"),
        "headtail or none",
    ),
    "parallelism.expert_parallel_degree": _at_least(1),
    "parallelism.expert_tensor_parallel_degree": _at_least(1),
    "parallelism.pipeline_parallel_microbatch_size": _at_least(1),
    "parallelism.pipeline_parallel_first_stage_less_layers": _at_least(0),
    "parallelism.pipeline_parallel_last_stage_less_layers": _at_least(0),
    "parallelism.pipeline_parallel_layers_per_stage": _optional(_at_least(1)),
    "checkpoint.interval": _at_least(1),
    "checkpoint.keep_latest_k": (
        lambda v: v == 0 or v >= 2,
        "0 (keep all) or a value >= 2 (1 is not allowed: the newest checkpoint may still be being written)",
    ),
    "checkpoint.load_step": (lambda v: v >= -1, "-1 (the latest) or a step >= 0"),
    "metrics.log_freq": _at_least(1),
    "metrics.cpu_peak_tflops": _optional(_positive()),
    "profiling.profile_freq": _at_least(1),
    "profiling.profiler_active": _at_least(1),
    "profiling.profiler_warmup": _at_least(0),
    "validation.local_batch_size": _at_least(1),
    "validation.seq_len": _at_least(1),
    "validation.freq": _at_least(1),
    "validation.steps": _minus_one_or_at_least_one("until the dataset is exhausted"),
    "comm.init_timeout_seconds": _at_least(1),
    "comm.train_timeout_seconds": _at_least(1),
    "comm.trace_buf_size": _at_least(0),
}


# Converter names torchtitan defines whose implementation this project does not have yet
# (`quantize.linear.mx` is refused by its converter, which first checks the hardware).
_UNBUILT_CONVERTERS = ("quantize.grouped_mm.float8", "quantize.grouped_mm.mx")

# Switches of features that are not built yet: key -> (is it switched on?, how to switch it off).
# Only the switch is refused; the fields that merely parametrize a feature stay accepted while it is
# off, because torchtitan's own TOML files set them. A feature's issue removes its row when it lands.
NOT_BUILT: dict[str, Rule] = {
    "parallelism.expert_parallel_degree": (lambda v: v > 1, "set it to 1"),
    "parallelism.expert_tensor_parallel_degree": (lambda v: v > 1, "set it to 1"),
    "parallelism.enable_compiled_autograd": (bool, "drop the flag"),
    "optimizer.early_step_in_backward": (bool, "drop the flag"),
    "model.converters": (
        lambda names: any(n in _UNBUILT_CONVERTERS for n in names),
        f"remove {' / '.join(_UNBUILT_CONVERTERS)} from the list",
    ),
    "fault_tolerance.enable": (bool, "drop the flag"),
}


def _refuse_unbuilt(config: JobConfig) -> None:
    for key, (switched_on, fix) in NOT_BUILT.items():
        value = _get(config, key)
        if switched_on(value):
            shown = str(value).lower() if isinstance(value, bool) else value
            raise ConfigError(f"{key}={shown} is not supported yet; fix: {fix}")


def _get(config: Any, key: str) -> Any:
    return reduce(getattr, key.split("."), config)


def _fail(key: str, value: Any, fix: str) -> ConfigError:
    return ConfigError(f"{key} = {value!r} is invalid; fix: use {fix}")


def gradient_accumulation_steps(training: Any, dp_world_size: int) -> int:
    """Microbatches per optimizer step: `global_batch_size` / (`local_batch_size` x data-parallel degree),
    1 when `global_batch_size` is -1. ConfigError when it is not a positive multiple."""
    local, global_ = training.local_batch_size, training.global_batch_size
    per_microbatch = local * dp_world_size
    if global_ == -1:
        return 1
    if global_ <= 0 or global_ % per_microbatch:
        fix = f"-1 or a positive multiple of training.local_batch_size ({local})"
        if dp_world_size > 1:
            fix += f" x the data-parallel degree ({dp_world_size}) = {per_microbatch}"
        raise _fail("training.global_batch_size", global_, fix)
    return global_ // per_microbatch


def validate(config: JobConfig) -> None:
    """Check ranges and cross-field rules; normalize what torchtitan normalizes (with a warning).

    Raises ConfigError (one line: key, value, fix) on the first violation.
    """
    for key, (ok, fix) in _RULES.items():
        value = _get(config, key)
        if not ok(value):
            raise _fail(key, value, fix)

    t = config.training
    gradient_accumulation_steps(t, dp_world_size=1)  # the data-parallel degree is checked again later
    dl = t.dataloader
    if dl.num_workers == 0 and dl.persistent_workers:
        raise _fail("training.dataloader.persistent_workers", True, "false, or set training.dataloader.num_workers > 0")
    if dl.num_workers == 0 and dl.prefetch_factor is not None:
        raise _fail(
            "training.dataloader.prefetch_factor",
            dl.prefetch_factor,
            "None, or set training.dataloader.num_workers > 0",
        )

    option = config.activation_checkpoint.selective_ac_option
    if option != "op" and not (option.isdigit() and int(option) >= 1):
        raise _fail("activation_checkpoint.selective_ac_option", option, "'op' or a positive integer such as '2'")

    lr = config.lr_scheduler
    total = lr.total_steps if lr.total_steps is not None else t.steps
    if lr.warmup_steps > total:
        logger.warning(
            f"lr_scheduler.warmup_steps ({lr.warmup_steps}) exceeds the total training steps ({total}); "
            f"adjusting warmup steps to {total}"
        )
        lr.warmup_steps = total

    v = config.validation
    if v.enable and config.parallelism.pipeline_parallel_degree > 1:
        # The pipeline schedule's stages keep the shapes of the training microbatches.
        for key, value, train_value in (("local_batch_size", v.local_batch_size, t.local_batch_size),
                                        ("seq_len", v.seq_len, t.seq_len)):
            if value != train_value:
                raise _fail(f"validation.{key}", value, f"training.{key} ({train_value}) under pipeline parallelism")

    config.model.converters = rename_converters(config.model.converters, "config")
    _refuse_unbuilt(config)
