"""Task configuration: nested dataclasses loaded from YAML plus command-line overrides.

Every task (integration, perturbation, ...) describes its settings as a tree of plain
dataclasses whose defaults are the SPEC defaults. A run's configuration is resolved in
one fixed order, ``defaults < YAML file < overrides`` (overrides = the CLI flags the user
actually typed), and the fully resolved tree is written next to the outputs so that a
run can be reproduced, or resumed, from its ``config.yaml`` alone.

Why not a generic library: the schema is small, errors must name the bad key *and* the
fix (``celltune.errors.InputError``), and the YAML must round-trip exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from celltune.errors import InputError
from celltune.files import write_text_atomic

T = TypeVar("T")

__all__ = [
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "diff_configs",
    "dump_config",
    "load_config",
    "parse_override",
]


def _type_name(tp: Any) -> str:
    """A short, human-readable name of a type annotation for error messages."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, Sequence, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert where the conversion is lossless.

    YAML and CLI strings give ints where floats are expected (``lr: 1`` or ``1e-4``
    parsed as a string by PyYAML), so ints become floats and numeric strings numbers;
    anything else that does not fit raises an InputError naming the key and the type.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is typing.Literal:
        return _coerce_literal(value, tp, key)
    if dataclasses.is_dataclass(tp):
        return _coerce_section(value, tp, key)
    if origin in (list, tuple, Sequence):
        return _coerce_list(value, tp, key)
    scalar = next((f for t, f in _SCALARS.items() if tp is t), None)
    return value if scalar is None else scalar(value, key)


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    """The first member of the union ``tp`` that ``value`` fits, trying exact types first."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    # Try the exact type first so that e.g. ``bool | str`` keeps a bool a bool.
    for arg in sorted(args, key=lambda a: 0 if isinstance(value, _plain(a)) else 1):
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except InputError as err:
            errors.append(err)
    raise InputError(
        f"config key '{key}' must be {_type_name(tp)}, got {value!r}: fix it in the "
        "YAML file or on the command line"
    )


def _coerce_literal(value: Any, tp: Any, key: str) -> Any:
    allowed = typing.get_args(tp)
    if value in allowed:
        return value
    raise InputError(
        f"config key '{key}' must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
    )


def _coerce_section(value: Any, tp: Any, key: str) -> Any:
    """A nested config dataclass from a mapping (an instance passes as is)."""
    if isinstance(value, tp):
        return value
    if not isinstance(value, Mapping):
        raise InputError(
            f"config key '{key}' is a section and needs a mapping of settings, got "
            f"{value!r}: indent its settings under '{key}:' in the YAML file"
        )
    return config_from_dict(tp, value, _prefix=f"{key}.")


def _coerce_list(value: Any, tp: Any, key: str) -> list[Any]:
    """A list of coerced items; a string is split on commas."""
    (item_tp,) = typing.get_args(tp) or (Any,)
    if isinstance(value, str):  # "pca,harmony" from a flag or YAML scalar
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise InputError(f"config key '{key}' must be a list, got {value!r}")
    return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]


def _coerce_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "yes", "on", "1"}:
        return True
    if isinstance(value, str) and value.lower() in {"false", "no", "off", "0"}:
        return False
    raise InputError(f"config key '{key}' must be true or false, got {value!r}")


def _coerce_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise InputError(f"config key '{key}' must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            pass
    raise InputError(f"config key '{key}' must be an integer, got {value!r}")


def _coerce_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise InputError(f"config key '{key}' must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise InputError(f"config key '{key}' must be a number, got {value!r}")


def _coerce_str(value: Any, key: str) -> str:
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    raise InputError(f"config key '{key}' must be a string, got {value!r}")


#: scalar annotations and their coercers; any other annotation passes the value through
_SCALARS: dict[Any, Any] = {
    bool: _coerce_bool,
    int: _coerce_int,
    float: _coerce_float,
    str: _coerce_str,
}


def _plain(tp: Any) -> type | tuple[type, ...]:
    """The runtime class to ``isinstance``-check against for annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin is not None:
        return origin if isinstance(origin, type) else ()
    return tp if isinstance(tp, type) else ()


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_from_dict(cls: type[T], data: Mapping[str, Any] | None, *, _prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys are errors with hints.

    Missing keys keep their defaults, so a YAML file only needs the settings it changes.
    """
    data = dict(data or {})
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean '{_prefix}{close[0]}'?)" if close else ""
        raise InputError(
            f"unknown config key '{_prefix}{key}'{hint}: valid keys here are "
            f"{', '.join(_prefix + f for f in fields)}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        f = fields[key]
        # A section given partially keeps the *parent's* defaults for the rest (a
        # ``default_factory`` may differ from the section class's own defaults).
        if (
            dataclasses.is_dataclass(hints[key])
            and isinstance(value, Mapping)
            and f.default_factory is not dataclasses.MISSING
        ):
            value = _deep_merge(config_to_dict(f.default_factory()), value)
        kwargs[key] = _coerce(value, hints[key], _prefix + key)
    return cls(**kwargs)


def _deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` laid over it, recursing into nested mappings."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-able) of a config dataclass, fields in declaration order."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, os.PathLike):
            value = str(value)
        out[f.name] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"train.epochs=5"`` into ``("train.epochs", 5)``; the value is parsed as YAML."""
    if "=" not in text:
        raise InputError(
            f"override '{text}' has no '=': write overrides as section.key=value, "
            "e.g. train.epochs=5"
        )
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


_EXPLICIT = "_explicit_keys"


def explicit_keys(cfg: Any) -> frozenset[str]:
    """Dotted keys the user set (YAML file, ``--set``, flags), even to a default's value:
    a recipe (:mod:`celltune.tasks.integration.recipe`) leaves them alone."""
    return frozenset(getattr(cfg, _EXPLICIT, frozenset()))


def _mark_explicit(cfg: T, keys: Iterable[str]) -> T:
    object.__setattr__(cfg, _EXPLICIT, explicit_keys(cfg) | frozenset(keys))
    return cfg


def _flat_keys(data: Mapping[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in data.items():
        if isinstance(v, Mapping) and v:
            out |= _flat_keys(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def apply_overrides(cfg: T, overrides: Mapping[str, Any] | Sequence[str] | None) -> T:
    """Return a copy of ``cfg`` with dotted-key overrides applied and type-checked.

    ``overrides`` maps ``"section.key"`` to a value (``None`` values are skipped: a CLI
    flag the user did not give), or is a list of ``"section.key=value"`` strings.
    """
    if not overrides:
        return cfg
    items = (
        [parse_override(o) for o in overrides]
        if not isinstance(overrides, Mapping)
        else [(k, v) for k, v in overrides.items() if v is not None]
    )
    tree = config_to_dict(cfg)
    for key, value in items:
        parts = key.split(".")
        node: Any = tree
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:i]) or "top level"
                options = sorted(node) if isinstance(node, dict) else []
                close = difflib.get_close_matches(part, options, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise InputError(
                    f"unknown config key '{key}'{hint}: valid keys at {where} are "
                    f"{', '.join(options)}"
                )
            if i == len(parts) - 1:
                if isinstance(node[part], dict) and not isinstance(value, Mapping):
                    raise InputError(
                        f"config key '{key}' is a section: override one of its keys, "
                        f"e.g. {key}.{next(iter(node[part]))}=..."
                    )
                node[part] = value
            else:
                node = node[part]
    keys = {
        k2
        for key, value in items
        for k2 in (_flat_keys(value, f"{key}.") if isinstance(value, Mapping) else {key})
    }
    return _mark_explicit(config_from_dict(type(cfg), tree), explicit_keys(cfg) | keys)


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    *,
    schema: type[T],
) -> T:
    """Resolve a config: ``schema`` defaults, then the YAML file at ``path``, then overrides.

    ``path=None`` means defaults only. Errors (missing file, bad YAML, unknown key, wrong
    type) are InputErrors that say which file/key and how to fix it.
    """
    data: Mapping[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(
                f"config file {p} does not exist: check the --config path "
                "(examples/integrate.yaml is a commented template)"
            )
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise InputError(f"config file {p} is not valid YAML ({err}): fix the syntax") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise InputError(
                f"config file {p} must hold a mapping of sections (e.g. 'train:'), "
                f"got a {type(loaded).__name__}"
            )
        data = loaded
    try:
        cfg = config_from_dict(schema, data)
    except InputError as err:
        where = f" in {path}" if path is not None else ""
        raise InputError(f"{err}{where}") from None
    return apply_overrides(_mark_explicit(cfg, _flat_keys(data)), overrides)


def config_to_yaml(cfg: Any, header: str | None = None) -> str:
    """The resolved config as YAML text (sections in declaration order)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    return text


def dump_config(cfg: Any, path: str | os.PathLike[str], header: str | None = None) -> Path:
    """Write the resolved config to ``path`` atomically; ``load_config`` reads it back equal."""
    write_text_atomic(path, config_to_yaml(cfg, header))
    return Path(path)


def diff_configs(a: Any, b: Any, *, ignore: Sequence[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs of the same schema.

    Keys in ``ignore`` (or below an ignored section) are skipped; used to refuse a
    ``--resume`` whose settings would change what the checkpoint means.
    """

    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, Mapping):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    fa, fb = flat(config_to_dict(a)), flat(config_to_dict(b))
    skip = tuple(ignore)

    def ignored(key: str) -> bool:
        return any(key == s or key.startswith(s + ".") for s in skip)

    return sorted(k for k in fa.keys() | fb.keys() if not ignored(k) and fa.get(k) != fb.get(k))
