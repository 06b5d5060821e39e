"""Recipe TOML → :class:`~pipeline.config.JobCfg`, ``--section.key=value`` overrides, and the dump.

Every value is checked against the field's type at load time; the first problem raises
:class:`~pipeline.config.ConfigError` with the dotted key, the bad value and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import logging
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, JobCfg

logger = logging.getLogger(__name__)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> JobCfg:
    """Loads a recipe, applies overrides and validates everything.

    Args:
        path: Recipe TOML file, or None for the defaults alone.
        overrides: Items of the form ``--section.key=value`` (the leading dashes are optional). Values
            are parsed as TOML (``1e-3``, ``true``, ``[0.5, 1.0]``); anything that is not TOML is a string.

    Returns:
        The validated config tree.

    Raises:
        ConfigError: For a missing or malformed file, an unknown key, a wrong type or a bad value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_toml(Path(path))
    for item in overrides:
        _apply_override(raw, item)
    return build(JobCfg, raw, "")


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"recipe {str(path)!r} is not valid TOML: {err}") from None


def parse_value(text: str) -> Any:
    """Parses an override value as TOML, falling back to a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.lstrip("-").partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override {item!r}: expected --section.key=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[leaf] = parse_value(text)


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Builds dataclass ``cls`` from a TOML table, checking keys and types recursively.

    Args:
        cls: A config dataclass.
        raw: The table for it.
        prefix: Dotted path of the table, for error messages ("" at the top).

    Returns:
        An instance of ``cls``.
    """
    where = prefix or "the recipe"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} = {raw!r}: must be a table of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if hasattr(cls, "with_recipe"):  # a section that can start from a named recipe (data.video)
        raw = cls.with_recipe(raw)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(_unknown_key(dotted, key, list(fields)))
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _unknown_key(dotted: str, key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {dotted!r}{hint}; allowed: {', '.join(allowed)}"


def _coerce(tp: Any, value: Any, key: str) -> Any:  # noqa: C901 - one branch per supported type
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key} = {value!r}: must be one of {', '.join(map(repr, args))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} = {value!r}: must be a number")
        return float(value)
    if tp is str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # `--run.name=2024` parses as a number
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: must be a string")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key} = {value!r}: must be a list of {len(args)} numbers")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r}: must be a table, e.g. {{ depth = 6 }}")
        return dict(value)
    if origin in (types.UnionType, typing.Union):
        raise NotImplementedError(f"union types are not supported in configs ({key})")
    raise NotImplementedError(f"unsupported config type {tp} for {key}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Returns the config as nested plain dicts (tuples become lists)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Returns ``{"section.key": value}`` for every field, nested sections dotted (for MLflow params)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{key}."))
        else:
            out[key] = _plain(value)
    return out


def dump_toml(cfg: JobCfg) -> str:
    """Renders the resolved config as TOML that :func:`load_config` reads back to an equal config."""
    lines = ["# Resolved vitpipe run configuration (recipe + overrides + defaults)."]
    for section in dataclasses.fields(cfg):
        lines.extend(_toml_table(getattr(cfg, section.name), section.name))
    return "\n".join(lines) + "\n"


def _toml_table(cfg: Any, name: str) -> list[str]:
    """``[name]`` with the section's keys, then its nested sections as ``[name.key]`` tables."""
    lines, nested = [f"\n[{name}]"], []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            nested.extend(_toml_table(value, f"{name}.{f.name}"))
        else:
            lines.append(f"{f.name} = {_toml_value(_plain(value))}")
    return lines + nested


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def field_docs(cls: type = JobCfg) -> list[tuple[str, str, str]]:
    """Lists every config key with its default and its docstring.

    Returns:
        ``(dotted key, default as TOML, docstring)`` tuples, in declaration order.
    """
    return _field_rows(cls(), "")


def _field_rows(cfg: Any, prefix: str) -> list[tuple[str, str, str]]:
    rows = []
    docs = _attribute_docstrings(type(cfg)) if prefix else {}
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            rows.extend(_field_rows(value, f"{key}."))
        else:
            rows.append((key, _toml_value(_plain(value)), docs.get(f.name, "")))
    return rows


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """Reads the string literal under each annotated field of a dataclass's source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
            docs[stmt.target.id] = " ".join(str(nxt.value.value).split())
    return docs
