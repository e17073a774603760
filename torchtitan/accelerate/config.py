"""The plugin's configuration: our TOML schema or the Accelerate page's shape, TORCHTITAN_* environment
variables, and the precedence defaults < environment < explicit arguments, resolved into one JobConfig."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from typing import Any

from torchtitan.config import ConfigError, JobConfig
from torchtitan.config.deprecations import find_alias
from torchtitan.config.manager import _suggest, load_toml
from torchtitan.config.schema import coerce, leaves, sections
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

_OPTIMIZER_NAMES = {"adamw": "AdamW", "adam": "Adam"}


def _ac_mode(value: Any) -> str:
    return "full" if value else "none"


def _optimizer_name(value: Any) -> str:
    return _OPTIMIZER_NAMES.get(str(value).lower(), str(value))


# Accelerate-page key -> (our JobConfig key, value transform). Keys whose names are already ours
# (training.seq_len, optimizer.lr, model.name, ...) need no entry.
RENAMED_KEYS: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
    "training.batch_size": ("training.local_batch_size", None),
    "training.max_steps": ("training.steps", None),
    "training.learning_rate": ("optimizer.lr", None),
    "training.warmup_steps": ("lr_scheduler.warmup_steps", None),
    "parallelism.tensor_parallel": ("parallelism.tensor_parallel_degree", None),
    "parallelism.pipeline_parallel": ("parallelism.pipeline_parallel_degree", None),
    "parallelism.data_parallel": ("parallelism.data_parallel_shard_degree", None),
    "parallelism.sequence_parallel": ("parallelism.disable_sequence_parallel", lambda v: not v),
    "optimizer.name": ("optimizer.name", _optimizer_name),
    "checkpointing.save_interval": ("checkpoint.interval", None),
    "checkpointing.save_dir": ("checkpoint.folder", None),
    "checkpointing.resume_from_checkpoint": ("checkpoint.initial_load_path", None),
    "memory.gradient_checkpointing": ("activation_checkpoint.mode", _ac_mode),
    "memory.activation_checkpointing": ("activation_checkpoint.mode", _ac_mode),
    "memory.cpu_offload": ("training.enable_cpu_offload", None),
}
# Accelerate-page model sizes -> the fields of the custom flavor built from them (Llama-style args).
FLAVOR_KEYS = {
    "model.vocab_size": "vocab_size",
    "model.embed_dim": "dim",
    "model.num_layers": "n_layers",
    "model.num_heads": "n_heads",
    "model.num_kv_heads": "n_kv_heads",
    "model.intermediate_size": "intermediate_size",
    "model.max_seq_len": "max_seq_len",
    "model.rope_theta": "rope_theta",
}
GRAD_ACCUM_KEY = "training.gradient_accumulation_steps"
ACCELERATE_KEYS = (*RENAMED_KEYS, *FLAVOR_KEYS, GRAD_ACCUM_KEY)

# Environment variable -> the key (ours or the Accelerate page's) it sets.
ENV_KEYS = {
    "TORCHTITAN_MODEL_NAME": "model.name",
    "TORCHTITAN_CHECKPOINT_DIR": "checkpointing.save_dir",
    "TORCHTITAN_TP_SIZE": "parallelism.tensor_parallel",
    "TORCHTITAN_PP_SIZE": "parallelism.pipeline_parallel",
    "TORCHTITAN_DP_SIZE": "parallelism.data_parallel",
    "TORCHTITAN_GRADIENT_CHECKPOINTING": "memory.gradient_checkpointing",
    "TORCHTITAN_ACTIVATION_CHECKPOINTING": "memory.activation_checkpointing",
}
ENV_CONFIG_PATH = "TORCHTITAN_CONFIG_PATH"
_ENV_TYPES = {"parallelism": int, "memory": bool, "model": str, "checkpointing": str}


@dataclasses.dataclass
class Translated:
    """One configuration source in our terms: dotted JobConfig keys, custom-flavor fields, grad accumulation."""

    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    flavor: dict[str, Any] = dataclasses.field(default_factory=dict)
    grad_accum: int | None = None

    def update(self, other: Translated) -> None:
        self.values.update(other.values)
        self.flavor.update(other.flavor)
        if other.grad_accum is not None:
            self.grad_accum = other.grad_accum


def translate(data: dict[str, Any], where: str) -> Translated:
    """Map a nested dict in our schema and/or the Accelerate page's shape to our keys, logging one line
    per Accelerate key; a key known to neither is a one-line ConfigError with a did-you-mean."""
    schema = leaves(JobConfig)
    ours = set(sections(JobConfig))
    known_keys = [*schema, *ACCELERATE_KEYS]
    known_sections = ours | {k.split(".")[0] for k in ACCELERATE_KEYS}
    out = Translated()
    for section, table in data.items():
        if section not in known_sections and find_alias(section) is None:
            raise ConfigError(
                f"unknown config section [{section}] ({where}); {_suggest(section, known_sections, '[{}]')}"
            )
        if not isinstance(table, dict):
            out.values[section] = table  # reported by the JobConfig parser
            continue
        for name, value in table.items():
            key = f"{section}.{name}"
            if key in FLAVOR_KEYS:
                out.flavor[FLAVOR_KEYS[key]] = value
                logger.info(f"config ({where}): {key}={value!r} -> custom flavor field {FLAVOR_KEYS[key]}")
            elif key == GRAD_ACCUM_KEY:
                out.grad_accum = int(value)
                logger.info(
                    f"config ({where}): {key}={value!r} -> training.global_batch_size "
                    "(local_batch_size x this x data-parallel degree)"
                )
            elif key in RENAMED_KEYS:
                _map_renamed(out, key, value, where)
            elif isinstance(value, dict) or key in schema or find_alias(key) is not None:
                out.values[key] = value
            else:
                raise ConfigError(f"unknown config key {key} ({where}); {_suggest(key, known_keys, '{}')}")
    return out


def _map_renamed(out: Translated, key: str, value: Any, where: str) -> None:
    target, transform = RENAMED_KEYS[key]
    if key == "checkpointing.resume_from_checkpoint" and not value:
        logger.info(f"config ({where}): {key}={value!r} -> nothing to resume ({target} left unset)")
        return
    mapped = transform(value) if transform else value
    if target == "activation_checkpoint.mode" and out.values.get(target) == "full":
        mapped = "full"  # either memory flag being true turns checkpointing on
    out.values[target] = mapped
    extra = ""
    if key.startswith("checkpointing.save_"):
        out.values["checkpoint.enable"] = True
        extra = " and checkpoint.enable=True"
    logger.info(f"config ({where}): {key}={value!r} -> {target}={mapped!r}{extra}")


def from_environment(environ: dict[str, str] | None = None) -> tuple[str | None, Translated]:
    """TORCHTITAN_CONFIG_PATH and the TORCHTITAN_* variables set in `environ` (default: os.environ)."""
    environ = os.environ if environ is None else environ
    nested: dict[str, dict[str, Any]] = {}
    for var, key in ENV_KEYS.items():
        if var not in environ:
            continue
        section, name = key.split(".")
        try:
            value = coerce(environ[var], _ENV_TYPES[section], from_cli=True)
        except ValueError as e:
            raise ConfigError(f"bad value for environment variable {var}: {environ[var]!r}; fix: {e}") from None
        nested.setdefault(section, {})[name] = value
    return environ.get(ENV_CONFIG_PATH) or None, translate(nested, "environment")


def _nest(values: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in values.items():
        *path, name = key.split(".")
        table = nested
        for part in path:
            table = table.setdefault(part, {})
        table[name] = value
    return nested


def resolve_job_config(
    job_config: dict[str, Any] | str | os.PathLike | JobConfig | None,
    model_name: str | None = None,
    environ: dict[str, str] | None = None,
) -> tuple[JobConfig, int | None]:
    """The validated JobConfig from defaults < environment < explicit `job_config` < explicit `model_name`,
    and the gradient accumulation steps the sources asked for (None: not given)."""
    if isinstance(job_config, JobConfig):
        if model_name is not None:
            job_config.model.name = model_name
        return job_config, None
    env_path, env = from_environment(environ)
    merged = Translated()
    if job_config is None and env_path is not None:
        merged.update(translate(load_toml(env_path), f"{ENV_CONFIG_PATH}={env_path}"))
    merged.update(env)
    if isinstance(job_config, dict):
        merged.update(translate(job_config, "the job_config dict"))
    elif job_config is not None:
        path = os.fspath(job_config)
        merged.update(translate(load_toml(path), f"in {path}"))
    if model_name is not None:
        merged.values["model.name"] = model_name
    config = JobConfig.from_dict(_nest(merged.values))
    if merged.flavor:
        config.model.flavor = register_custom_flavor(config.model.name, config.model.flavor, merged.flavor)
    return config, merged.grad_accum


def register_custom_flavor(model_name: str, base_flavor: str, fields: dict[str, Any]) -> str:
    """Register (once) a flavor of `model_name` that is `base_flavor` with `fields` replaced; returns its name.

    `intermediate_size` is expressed through the Llama FFN sizing (multiple_of, ffn_dim_multiplier).
    """
    import torchtitan.builtins  # noqa: F401  (registers the built-in models)
    from torchtitan.protocols.train_spec import get_train_spec

    spec = get_train_spec(model_name)
    if base_flavor not in spec.model_args:
        raise ConfigError(
            f"model.flavor={base_flavor!r} is not a flavor of {model_name!r}; choose one of {sorted(spec.model_args)}"
        )
    base = spec.model_args[base_flavor]
    fields = dict(fields)
    size = fields.pop("intermediate_size", None)
    known = {f.name for f in dataclasses.fields(base)}
    for name in fields:
        if name not in known:
            key = next(k for k, v in FLAVOR_KEYS.items() if v == name)
            raise ConfigError(f"{key}: model {model_name!r} has no field {name!r}; drop the key")
    args = dataclasses.replace(base, **fields)
    if size is not None:
        if not {"multiple_of", "ffn_dim_multiplier", "dim"} <= known:
            raise ConfigError(f"model.intermediate_size: model {model_name!r} does not size its FFN by it; drop it")
        args.multiple_of = 1
        args.ffn_dim_multiplier = (int(size) + 0.5) / int(2 * 4 * args.dim / 3)
    digest = hashlib.sha1(repr((base_flavor, sorted(fields.items()), size)).encode()).hexdigest()[:8]
    name = f"custom_{digest}"
    spec.model_args.setdefault(name, args)
    logger.info(f"config: model sizes {dict(fields, **({'intermediate_size': size} if size else {}))} -> "
                f"model.flavor={name!r} (based on {base_flavor!r})")
    return name
