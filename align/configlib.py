"""Typed, frozen configs from YAML plus `key.sub=value` overrides.

Precedence: dataclass defaults < YAML < command line. Unknown keys, wrong types and impossible values
raise `ConfigError` naming the key, the value and (for unknown keys) the nearest valid key. A field's
`help` metadata is its one-line description (shown by `align validate --help-keys`). A config class may
name removed keys and what replaced them in a `REPLACED_KEYS` class attribute: such a key is refused
with that fix rather than a nearest-key guess.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Hashable
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config problem a user must fix: the message names the key, the value and the fix."""


def option(default: Any = MISSING, help: str = "", *, factory: Any = MISSING) -> Any:
    """A config field with its one-line description."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def check(condition: bool, key: str, value: Any, fix: str) -> None:
    """Raise a ConfigError about `key` unless `condition` holds (used in `__post_init__`)."""
    if not condition:
        raise ConfigError(f"{key}={value!r}: {fix}")


def derive(obj: Any, name: str, value: Any) -> None:
    """Set a derived (init=False) field on a frozen dataclass, once, at load."""
    object.__setattr__(obj, name, value)


def _nearest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(choices))}."


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check (and lightly coerce) `value` against the annotation `tp`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{key}={value!r}: must be one of {choices}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        ktp, vtp = get_args(tp) or (Any, Any)
        return {_convert(ktp, k, key): _convert(vtp, v, f"{key}.{k}") for k, v in value.items()}
    if is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if tp is float:
        # YAML 1.1 reads `2e-5` (no dot) as a string: accept any string that is a float.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, strictly."""
    where = prefix or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    settable = {f.name: f for f in fields(cls) if f.init}
    replaced = getattr(cls, "REPLACED_KEYS", {})
    for key in data:
        if key not in settable:
            full = f"{prefix}.{key}" if prefix else str(key)
            if key in replaced:
                raise ConfigError(f"'{full}' was removed: {replaced[key]}")
            raise ConfigError(f"unknown key '{full}' ({where}).{_nearest(str(key), list(settable))}")
    kwargs = {}
    for name, f in settable.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = data[name]
            if isinstance(value, dict) and f.default_factory is not MISSING:
                # A section given in YAML overrides its stage-specific defaults key by key.
                default = f.default_factory()
                if is_dataclass(default):
                    value = _merge(init_dict(default), value)
            kwargs[name] = _convert(hints[name], value, full)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"missing required key '{full}': {f.metadata.get('help', '')}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{e}") from None


def init_dict(obj: Any) -> Any:
    """The settable (init) fields of a dataclass instance, nested, as plain data."""
    if is_dataclass(obj):
        return {f.name: init_dict(getattr(obj, f.name)) for f in fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [init_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: init_dict(v) for k, v in obj.items()}
    return obj


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=1` -> (['a', 'b'], 1); the value is read as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. sft.lr=1e-5")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: the key is empty; expected KEY=VALUE, e.g. sft.lr=1e-5")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(cls: type, data: dict, overrides: list[str]) -> dict:
    """Merge overrides into the raw YAML mapping, checking each key path against the schema."""
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node, tp, prefix = data, cls, ""
        for i, part in enumerate(path):
            valid = {f.name: f for f in fields(tp) if f.init} if is_dataclass(tp) else None
            full = f"{prefix}.{part}" if prefix else part
            if valid is not None and part not in valid:
                if part in getattr(tp, "REPLACED_KEYS", {}):
                    raise ConfigError(f"'{full}' was removed (in override {text!r}): {tp.REPLACED_KEYS[part]}")
                raise ConfigError(f"unknown key '{full}' (in override {text!r}).{_nearest(part, list(valid))}")
            if i == len(path) - 1:
                node[part] = value
                break
            child_tp = typing.get_type_hints(tp)[part] if valid is not None else Any
            child_tp = _unwrap_optional(child_tp)
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node, tp, prefix = child, child_tp, full
    return data


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader, except that a key given twice in one mapping is an error: PyYAML keeps the
    last silently, so a repeated `lr:` would quietly override the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                break  # the base constructor reports it ("found unhashable key"), a YAMLError
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: check the path (shipped configs are in configs/)")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e}); save the config as UTF-8") from None
    except _DuplicateKey as e:
        raise ConfigError(
            f"{path}: key {e.key!r} is given twice in one section, at lines {e.first} and {e.second}; keep one"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain YAML-able data (derived fields included)."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def help_lines(cls: type, prefix: str = "") -> list[str]:
    """`key: type = default  # help` for every key, nested sections included. The keys of a list's item
    dataclass (DatasetSpec) follow once at the end, under `<ItemClass>.`, not once per list."""
    items: dict[type, list[str]] = {}
    out = _help_lines(cls, prefix, items)
    for item, lists in items.items():
        out.append(f"<{item.__name__}>:  # each entry of the lists {', '.join(lists)}")
        out.extend(_help_lines(item, f"<{item.__name__}>", items))
    return out


def _help_lines(cls: type, prefix: str, items: dict[type, list[str]]) -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if not f.init:
            continue
        full = f"{prefix}.{f.name}" if prefix else f.name
        tp = _unwrap_optional(hints[f.name])
        if is_dataclass(tp):
            out.append(f"{full}:  # {f.metadata.get('help', '')}")
            out.extend(_help_lines(tp, full, items))
            continue
        item = (get_args(tp) or (None,))[0] if get_origin(tp) in (list, tuple) else None
        type_name = _type_name(hints[f.name])
        if is_dataclass(item):
            items.setdefault(item, []).append(full)
            type_name = f"list of <{item.__name__}>"
        default = (
            f.default if f.default is not MISSING else ("<list>" if f.default_factory is not MISSING else "<required>")
        )
        out.append(f"{full}: {type_name} = {default!r}  # {f.metadata.get('help', '')}")
    return out


def replace(obj: Any, **changes: Any) -> Any:
    """dataclasses.replace that keeps derived fields derived (re-runs __post_init__)."""
    return dataclasses.replace(obj, **changes)
