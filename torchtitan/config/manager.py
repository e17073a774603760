"""ConfigManager: builds a JobConfig from defaults < `--job.config_file` TOML < command-line overrides."""

import dataclasses
import difflib
import importlib
import json
import os
import sys
from typing import Any

from torchtitan.config.deprecations import RENAMED_SECTIONS, Alias, find_alias
from torchtitan.config.errors import ConfigError
from torchtitan.config.job_config import JobConfig
from torchtitan.config.schema import (
    BOOL_WORDS,
    Leaf,
    coerce,
    help_text,
    is_section,
    leaves,
    merge_config_classes,
    sections,
    tomllib,
    type_name,
)
from torchtitan.config.validation import validate
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

_CLI = "command line"


def to_dict(job_config: Any) -> dict[str, Any]:
    """The config as nested plain dicts (JSON-serializable), e.g. for metrics or checkpoint metadata."""
    return dataclasses.asdict(job_config)


def to_toml(job_config: Any) -> str:
    """The config as TOML text that parse_args reads back (None values are left out)."""
    return _toml_tables(to_dict(job_config), "").lstrip("\n")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _toml_tables(table: dict[str, Any], name: str) -> str:
    scalars = [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict) and v is not None]
    text = f"\n[{name}]\n" + "".join(line + "\n" for line in scalars) if name and scalars else ""
    for k, v in table.items():
        if isinstance(v, dict):
            text += _toml_tables(v, f"{name}.{k}" if name else k)
    return text


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML config file (UTF-8, with or without the byte-order mark Windows editors write);
    a missing or malformed file raises a one-line ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(
            f"config file not found: {path} (--job.config_file); fix: pass the path of an existing TOML file"
        )
    try:
        with open(path, encoding="utf-8-sig") as f:
            return tomllib.loads(f.read())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        reason = " ".join(str(e).split())
        raise ConfigError(f"cannot parse TOML config file {path}: {reason}; fix: correct the TOML syntax") from None


def _import(module: str, key: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"{key} = {module!r}: cannot import it ({type(e).__name__}: {e}); "
            "fix: give an importable module name (check the spelling and PYTHONPATH)"
        ) from None


def _custom_config_class(module: str) -> type:
    cls = getattr(_import(module, "job.custom_config_module"), "JobConfig", None)
    if not is_section(cls):
        raise ConfigError(
            f"job.custom_config_module = {module!r} defines no JobConfig dataclass; fix: add `@dataclass class JobConfig`"
        )
    return cls


def _prescan(args: list[str], *keys: str) -> str | None:
    """The last command-line value of any of `keys`, read before the schema is known."""
    found = None
    for i, token in enumerate(args):
        if not token.startswith("--"):
            continue
        name, eq, value = token[2:].partition("=")
        if name.replace("-", "_") in keys:
            if eq:
                found = value
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                found = args[i + 1]
    return found


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class ConfigManager:
    """Parses job configs: `ConfigManager().parse_args(argv) -> JobConfig`.

    Precedence: dataclass defaults < `--job.config_file` TOML < command line. `job.custom_config_module`
    (TOML or CLI) merges a user JobConfig dataclass into `config_cls` before anything else is parsed.
    """

    def __init__(self, config_cls: type = JobConfig):
        self.config_cls = config_cls
        self.config: Any = None

    def parse_args(self, args: list[str] | None = None) -> JobConfig:
        """Build, validate and return the job config; `--help` prints the schema and exits 0."""
        args = list(sys.argv[1:] if args is None else args)
        config_file = _prescan(args, "job.config_file")
        toml_data = load_toml(config_file) if config_file else {}

        cls = self._config_class(args, toml_data)
        if "-h" in args or "--help" in args:
            print(help_text(cls))
            raise SystemExit(0)

        schema = leaves(cls)
        values: dict[str, Any] = {}
        if config_file:
            values.update(self._from_toml(toml_data, config_file, schema, set(sections(cls))))
        values.update(self._from_cli(args, schema))
        return self._build(cls, values)

    def parse_dict(self, data: dict[str, Any], where: str = "the config dict") -> JobConfig:
        """Build and validate a JobConfig from nested dicts in the TOML schema (`{"training": {"steps": 5}}`),
        with the same checks, deprecation mapping and errors as a `--job.config_file` TOML file."""
        cls = self._config_class([], data)
        schema = leaves(cls)
        return self._build(cls, self._from_toml(data, where, schema, set(sections(cls)), record_path=False))

    def _build(self, cls: type, values: dict[str, Any]) -> JobConfig:
        """Apply `values` (dotted key -> coerced value) over cls defaults, validate and finish."""
        config = cls()
        for key, value in values.items():
            *path, name = key.split(".")
            target = config
            for part in path:
                target = getattr(target, part)
            setattr(target, name, value)
        validate(config)

        if config.experimental.custom_import:
            _import(config.experimental.custom_import, "experimental.custom_import")
        if _is_rank0():
            if config.job.print_config:
                print(json.dumps(to_dict(config), indent=2))
            if config.job.save_config_file:
                self.save(config, config.job.save_config_file)
        self.config = config
        return config

    def _config_class(self, args: list[str], toml_data: dict[str, Any]) -> type:
        """config_cls, merged with the custom config module named on the command line or in the TOML."""
        custom = _prescan(args, "job.custom_config_module", "experimental.custom_args_module")
        if custom is None:
            for section, key in [("job", "custom_config_module"), ("experimental", "custom_args_module")]:
                table = toml_data.get(section)
                if isinstance(table, dict) and isinstance(table.get(key), str):
                    custom = custom or table[key]
        return merge_config_classes(self.config_cls, _custom_config_class(custom)) if custom else self.config_cls

    @staticmethod
    def save(config: Any, name: str) -> str:
        """Write the config under job.dump_folder as TOML (name ends in .toml) or JSON; returns the path."""
        path = os.path.join(config.job.dump_folder, name)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(to_toml(config) if name.endswith(".toml") else json.dumps(to_dict(config), indent=2) + "\n")
        logger.info(f"saved the job config to {path}")
        return path

    def _from_toml(
        self,
        data: dict[str, Any],
        path: str,
        schema: dict[str, Leaf],
        known_sections: set[str],
        record_path: bool = True,
    ) -> dict[str, Any]:
        where = f"in {path}"
        out: dict[str, Any] = {"job.config_file": path} if record_path else {}

        def walk(table: dict[str, Any], prefix: str) -> None:
            for name, value in table.items():
                key = prefix + name
                if not isinstance(value, dict):
                    self._set(out, key, value, schema, where, from_cli=False)
                elif key in known_sections or key in RENAMED_SECTIONS:
                    walk(value, key + ".")
                elif key in schema:
                    raise ConfigError(f"[{key}] ({where}) is a value, not a section; fix: write `{name} = ...` instead")
                else:
                    raise ConfigError(
                        f"unknown config section [{key}] ({where}); {_suggest(key, known_sections, '[{}]')}"
                    )

        walk(data, "")
        return out

    def _from_cli(self, args: list[str], schema: dict[str, Leaf]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        i = 0
        while i < len(args):
            token = args[i]
            i += 1
            if token in ("-h", "--help"):
                continue
            if not token.startswith("--") or token == "--":
                raise ConfigError(
                    f"unexpected command-line argument {token!r}; fix: write options as --section.field VALUE"
                )
            name, eq, raw = token[2:].partition("=")
            key = name.replace("-", "_")
            negated = _negated_bool(key, schema)
            if negated:
                if eq:
                    raise ConfigError(f"{token}: --{key} takes no value; fix: write --{negated} {raw}")
                self._set(out, negated, False, schema, _CLI, from_cli=False)
                continue
            leaf = schema.get(key) or _alias_leaf(key, schema)
            if eq:
                value = raw
            elif leaf is not None and leaf.type is bool:
                value = "true"
                if i < len(args) and args[i].lower() in BOOL_WORDS:
                    value, i = args[i], i + 1
            elif i < len(args) and not args[i].startswith("--"):
                value, i = args[i], i + 1
            elif leaf is None:
                value = None  # unknown key (reported by _set) or a removed one used as a flag
            else:
                kind = type_name(leaf.type)
                raise ConfigError(f"--{key} needs a value ({kind}); fix: write --{key} VALUE or --{key}=VALUE")
            self._set(out, key, value, schema, _CLI, from_cli=True)
        return out

    @staticmethod
    def _set(out: dict[str, Any], key: str, value: Any, schema: dict[str, Leaf], where: str, from_cli: bool) -> None:
        """Coerce and store one value, resolving deprecated names (with a warning)."""
        alias: Alias | None = None
        target = key
        if key not in schema:
            alias = find_alias(key)
            if alias is None or (alias.new_key is not None and alias.new_key not in schema):
                what = "option --" if where == _CLI else "config key "
                raise ConfigError(f"unknown {what}{key} ({where}); {_suggest(key, schema, '{}')}")
            if alias.new_key is None:
                alias.warn(where)
                return
            target = alias.new_key
        leaf = schema[target]
        try:
            value = coerce(value, leaf.type, from_cli)
        except ValueError as e:
            raise ConfigError(f"bad value for {key} ({where}): {value!r}; fix: {e}") from None
        if alias is not None:
            alias.warn(where, value)
            if alias.transform is not None:
                value = alias.transform(value)
        out[target] = value


def _alias_leaf(key: str, schema: dict[str, Leaf]) -> Leaf | None:
    alias = find_alias(key)
    return schema.get(alias.new_key) if alias is not None and alias.new_key else None


def _negated_bool(key: str, schema: dict[str, Leaf]) -> str | None:
    """For `section.no_field` naming a boolean (or a deprecated boolean's) field, the positive key."""
    section, _, name = key.rpartition(".")
    if key in schema or find_alias(key) or not name.startswith("no_"):
        return None
    positive = f"{section}.{name[3:]}" if section else name[3:]
    leaf = schema.get(positive) or _alias_leaf(positive, schema)
    return positive if leaf is not None and leaf.type is bool else None


def _suggest(key: str, known: Any, fmt: str) -> str:
    """'did you mean X?' for a misspelled dotted key, else a pointer to --help."""
    known = list(known)
    name = key.rpartition(".")[2]
    same_name = [k for k in known if k.rpartition(".")[2] == name]
    close = same_name or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        section = key.rpartition(".")[0]
        in_section = [k for k in known if k.rpartition(".")[0] == section]
        close = difflib.get_close_matches(key, in_section, n=1, cutoff=0.4)
    if close:
        return f"did you mean {fmt.format(close[0])}?"
    return "fix: run with --help to list the valid names"
