"""Typed, range-checked configuration fields, and the base class of method options.

Every configuration dataclass of jmoe (`MoEConfig`, the option dataclasses of routers,
dispatches and balance losses) declares each field with a type annotation and, where it has
one, a range: `option(default, ge=..., gt=..., le=..., lt=..., choices=...)`. `check_fields`
checks every field against both, whatever the source of the value (Python, `--set`,
config.json, YAML), and raises one `ValueError` naming the field, the value and what is
allowed. Integers given for float fields become floats; nothing else is converted.

A method's options are a frozen `Options` subclass kept next to the method's code and
registered with it (`ROUTERS.add("topk", router, options=TopKOptions)`); `MoEConfig` holds
the options of the methods it selects.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, ge=None, gt=None, le=None, lt=None, choices=None, doc: str = ""):
    """A dataclass field with a range: `ge`/`gt`/`le`/`lt` bounds, or allowed `choices`."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": None if choices is None else tuple(choices), "doc": doc}
    return dataclasses.field(default=default, metadata=meta)


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        none = type(None) in typing.get_args(tp)
        return " or ".join(parts + (["null"] if none else []))
    if origin is tuple or tp is tuple:
        return "a list"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp):
    """`value` as type `tp`, or raise TypeError. Ints become floats; lists become tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except TypeError:
                pass
        raise TypeError
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if origin is tuple or tp is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise TypeError
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise TypeError
    return value


def _range_text(meta) -> str:
    parts = []
    for key, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if meta.get(key) is not None:
            parts.append(f"{sym} {meta[key]}")
    return " and ".join(parts)


def check_field(owner: str, f: dataclasses.Field, value, tp):
    """The checked (and coerced) value of field `f`; ValueError naming `owner.field` otherwise."""
    name = f"{owner}.{f.name}"
    try:
        value = _coerce(value, tp)
    except TypeError:
        raise ValueError(f"{name}={value!r} must be {_describe(tp)}") from None
    meta = f.metadata
    if value is None:
        return value
    if isinstance(value, float) and not math.isfinite(value) and any(meta.get(k) is not None for k in ("ge", "gt", "le", "lt")):
        raise ValueError(f"{name}={value!r} must be a finite number {_range_text(meta)}")
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ValueError(f"{name}={value!r} must be one of {', '.join(map(str, meta['choices']))}")
    bad = (
        (meta.get("ge") is not None and not value >= meta["ge"])
        or (meta.get("gt") is not None and not value > meta["gt"])
        or (meta.get("le") is not None and not value <= meta["le"])
        or (meta.get("lt") is not None and not value < meta["lt"])
    )
    if bad:
        kind = "an integer" if tp is int else "a number"
        raise ValueError(f"{name}={value!r} must be {kind} {_range_text(meta)}")
    return value


def check_fields(obj, owner: str | None = None) -> None:
    """Check (and coerce in place) every field of the frozen dataclass `obj`."""
    owner = owner or type(obj).__name__
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = check_field(owner, f, getattr(obj, f.name), hints[f.name])
        object.__setattr__(obj, f.name, value)


def reject_unknown_fields(cls, d, owner: str) -> None:
    """ValueError unless `d` is a mapping whose keys are all fields of dataclass `cls`."""
    if not isinstance(d, dict):
        raise ValueError(f"{owner} must be a mapping of field names to values, got {type(d).__name__}")
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{owner} has no field(s) {', '.join(sorted(unknown))}")


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of every method's options: typed, range-checked, built from a dict or kwargs.

    Subclasses are frozen dataclasses whose fields use `option(...)`. Options that depend on
    the layer's sizes are checked by the method's `validate(cfg)`.
    """

    def __post_init__(self):
        check_fields(self, self.owner())

    @classmethod
    def owner(cls) -> str:
        return cls.__name__

    @classmethod
    def from_dict(cls, d: dict, owner: str | None = None) -> "Options":
        """Options from a dict; unknown keys are a ValueError naming them and the known ones."""
        owner = owner or cls.owner()
        if not isinstance(d, dict):
            raise ValueError(f"{owner} must be a mapping of option names to values, got {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"{owner} has no option(s) {', '.join(unknown)}; known: {', '.join(sorted(known)) or 'none'}"
            )
        try:
            return cls(**d)
        except ValueError as e:
            msg = str(e)
            prefix = cls.owner() + "."
            raise ValueError(owner + "." + msg[len(prefix):] if msg.startswith(prefix) else msg) from None

    def validate(self, cfg) -> None:
        """Checks that need the layer's sizes (`cfg` is the `MoEConfig`); none by default."""

    def replace(self, **changes) -> "Options":
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


@dataclasses.dataclass(frozen=True)
class NoOptions(Options):
    """The options of a method that has none."""
