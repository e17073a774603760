"""Introspection of JobConfig-style dataclasses: leaf fields, value coercion, custom-class merging, help."""

import ast
import dataclasses
import inspect
import textwrap
import types
from dataclasses import MISSING, dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from torchtitan.config.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
BOOL_WORDS = _TRUE | _FALSE


@dataclass(frozen=True)
class Leaf:
    """One configurable value: its dotted key, type, default and help line."""

    key: str
    type: Any
    default: Any
    help: str


def is_section(tp: Any) -> bool:
    """True for a nested section type (a dataclass class)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def section_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) pairs of a section class, string annotations resolved."""
    hints = get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def field_default(f: dataclasses.Field) -> Any:
    """The value a field takes when not configured."""
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None if f.default is MISSING else f.default


def field_help(cls: type, f: dataclasses.Field) -> str:
    """A field's help: `metadata["help"]`, else the string literal right after it in the class source."""
    return f.metadata.get("help") or _source_docstrings(cls).get(f.name, "")


def _source_docstrings(cls: type) -> dict[str, str]:
    # torchtitan-style custom modules document fields with a string literal after the annotation.
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def leaves(cls: type, prefix: str = "") -> dict[str, Leaf]:
    """Every configurable value of a config class by dotted key, nested sections flattened."""
    out: dict[str, Leaf] = {}
    for f, tp in section_fields(cls):
        key = f"{prefix}{f.name}"
        if is_section(tp):
            out.update(leaves(tp, key + "."))
        else:
            out[key] = Leaf(key, tp, field_default(f), field_help(cls, f))
    return out


def sections(cls: type, prefix: str = "") -> dict[str, str]:
    """Every section's dotted name mapped to its help line, parents before children."""
    out: dict[str, str] = {}
    for f, tp in section_fields(cls):
        if is_section(tp):
            name = f"{prefix}{f.name}"
            out[name] = field_help(cls, f)
            out.update(sections(tp, name + "."))
    return out


def type_name(tp: Any) -> str:
    """A short human-readable type: int, str | None, {a,b}, list[str]."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, from_cli: bool) -> Any:
    """Convert a TOML value (or a command-line string when from_cli) to `tp`.

    Raises ValueError whose message is the fix ("give an integer") when the value does not fit.
    """
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (from_cli and isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        reasons = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, from_cli)
            except ValueError as e:
                reasons.append(str(e).removeprefix("give "))
        raise ValueError("give " + " or ".join(reasons + (["None"] if type(None) in args else [])))
    if origin is Literal:
        for choice in args:
            if value == choice or (from_cli and str(choice) == value):
                return choice
        raise ValueError("give one of " + ", ".join(repr(a) for a in args))
    if origin is list:
        return _coerce_list(value, args[0], from_cli)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str) and value.lower() in BOOL_WORDS:
            return value.lower() in _TRUE
        raise ValueError("give a boolean (true or false)")
    if tp is int:
        if from_cli and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError("give an integer")
    if tp is float:
        if from_cli and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError("give a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError("give a string (quote it in TOML)")
    return value


def _coerce_list(value: Any, elem: Any, from_cli: bool) -> list:
    nested = get_origin(elem) is list
    if isinstance(value, str):
        text = value.strip()
        if from_cli and text.startswith("["):
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                raise ValueError('give a TOML array like ["a", "b"]') from None
            from_cli = False
        elif nested:
            # a,b;c,d -> [[a, b], [c, d]]
            return [_coerce_list(part, get_args(elem)[0], from_cli) for part in text.split(";") if part.strip()]
        else:
            value = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(value, list):
        kind = "a list of lists" if nested else "a list"
        raise ValueError(f"give {kind} (TOML array, or comma-separated on the command line)")
    return [coerce(v, elem, from_cli and isinstance(v, str)) for v in value]


def merge_config_classes(base: type, custom: type) -> type:
    """A subclass of `base` with `custom`'s fields added; sections present in both are merged recursively.

    Fields of `custom` override same-named ones of `base`, so isinstance(merged(), base) holds.
    """
    base_types = dict((f.name, tp) for f, tp in section_fields(base))
    base_fields = {f.name: f for f in dataclasses.fields(base)}
    new_fields = []
    for f, tp in section_fields(custom):
        old_tp = base_types.get(f.name)
        if is_section(tp) and is_section(old_tp):
            tp = merge_config_classes(old_tp, tp)
        elif is_section(tp):
            _require_defaults(tp)
        meta = {"help": field_help(custom, f) or (field_help(base, base_fields[f.name]) if old_tp else "")}
        if is_section(tp):
            spec = dataclasses.field(default_factory=tp, metadata=meta)
        elif f.default_factory is not MISSING:
            spec = dataclasses.field(default_factory=f.default_factory, metadata=meta)
        elif f.default is not MISSING:
            spec = dataclasses.field(default=f.default, metadata=meta)
        else:
            raise _no_default(custom, f)
        new_fields.append((f.name, tp, spec))
    return dataclasses.make_dataclass(base.__name__, new_fields, bases=(base,))


def _no_default(cls: type, f: dataclasses.Field) -> ConfigError:
    return ConfigError(f"custom config field {cls.__qualname__}.{f.name} has no default; fix: give it a default value")


def _require_defaults(cls: type) -> None:
    for f, tp in section_fields(cls):
        if f.default is MISSING and f.default_factory is MISSING:
            raise _no_default(cls, f)
        if is_section(tp):
            _require_defaults(tp)


def help_text(cls: type) -> str:
    """The --help listing: every section and field with type, default and description."""
    all_leaves = leaves(cls)
    lines = [
        "usage: python -m torchtitan.train [--job.config_file FILE.toml] [--section.field VALUE ...]",
        "",
        "Precedence: defaults < --job.config_file TOML < command line. Syntax: --section.field VALUE or",
        "--section.field=VALUE (dashes or underscores). Booleans: --section.field, --section.no_field,",
        "--section.field=true|false. Lists: comma-separated (a,b); lists of lists: a,b;c. See docs/config.md.",
    ]
    for name, doc in sections(cls).items():
        own = [leaf for key, leaf in all_leaves.items() if key.rpartition(".")[0] == name]
        lines += ["", f"[{name}]" + (f"  {doc}" if doc else "")]
        for leaf in own:
            lines.append(f"  --{leaf.key} {type_name(leaf.type)}  (default: {leaf.default!r})")
            lines.append(f"      {leaf.help}")
    return "\n".join(lines)
