"""Leaf-by-leaf machinery of merge methods: validation, leaf paths, filters, parameters that
vary over layers, and per-leaf PRNG keys.

A leaf's path is its tree path joined with "/" ("layers/3/attn/wq"); the leaves of a flat
{name: array} dict (a Hugging Face state dict) keep their names ("model.layers.3.mlp.w").
Its layer is the number after "layers" (or "layer", "h", "blocks"), and t = layer / (L - 1)
places it in the stack (t = 0 for embeddings, t = 1 for other leaves outside the stack).

A merge parameter (density, weight, t, lambda, ...) may be
  a number                                  the same for every leaf;
  a list of numbers                         a gradient: interpolated at the leaf's t
                                            (mergekit's semantics);
  a list of {"filter": s, "value": v}       the first entry whose filter is a regular
                                            expression found in the leaf's path (or no filter)
                                            gives the value (itself a number or a gradient).
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jmoe.parallel.rules import path_str  # noqa: F401  (re-exported: one key-path format for sharding rules and merges)

LAYER = re.compile(r"(?:^|[./])(?:layers|layer|h|blocks)[./_](\d+)(?:[./]|$)")


class MergeError(ValueError):
    """Bad merge input: mismatched trees, bad parameter values, no models."""


def leaves_with_paths(tree) -> list[tuple[str, Any]]:
    """(path, leaf) pairs of `tree` in flattening order."""
    return [(path_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def layer_of(path: str) -> int | None:
    """The layer number in a leaf path ("layers/3/attn/wq" -> 3), or None outside the layers."""
    m = LAYER.search(path)
    return int(m.group(1)) if m else None


def num_layers(paths: Sequence[str]) -> int:
    """Number of layers the paths span: the largest layer number + 1 (0 if none has one)."""
    layers = [layer_of(p) for p in paths]
    layers = [l for l in layers if l is not None]
    return max(layers) + 1 if layers else 0


def position(path: str, total_layers: int) -> float:
    """t in [0, 1] of a leaf along the layer stack (mergekit's convention)."""
    layer = layer_of(path)
    if layer is None:
        return 0.0 if "embed" in path.lower() else 1.0
    return layer / (total_layers - 1) if total_layers > 1 else 1.0


def interpolate(values: Sequence[float], t: float) -> float:
    """A gradient's value at t in [0, 1]: linear interpolation between `values` spaced evenly
    over [0, 1]."""
    if len(values) == 1:
        return float(values[0])
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * float(values[i0]) + frac * float(values[i1])


def resolve(value: Any, path: str, total_layers: int, name: str = "parameter") -> Any:
    """The value a parameter takes at leaf `path` (see the module docstring)."""
    return resolve_at(value, path, position(path, total_layers), name)


def resolve_at(value: Any, path: str, t: float, name: str = "parameter") -> Any:
    """`resolve` with the leaf's position t along the layer stack given explicitly."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        for cond in value:
            flt = cond.get("filter")
            if flt in (None, "*") or re.search(flt, path):
                if "value" not in cond:
                    raise MergeError(f"{name}: conditional entry {cond!r} has no 'value'")
                return resolve_at(cond["value"], path, t, name)
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            raise MergeError(f"{name}: an empty list is not a gradient")
        try:
            return interpolate(value, t)
        except (TypeError, ValueError):
            raise MergeError(f"{name}={value!r}: a gradient must be a list of numbers") from None
    return value


def _regex(pattern: str, name: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise MergeError(f"{name}={pattern!r} is not a regular expression ({e})") from None


class Selector:
    """Which leaves a method touches: `include`/`exclude` regular expressions over paths."""

    def __init__(self, include: str | None = None, exclude: str | None = None):
        self.include = _regex(include, "filter") if include else None
        self.exclude = _regex(exclude, "exclude") if exclude else None

    def __call__(self, path: str) -> bool:
        if self.include is not None and not self.include.search(path):
            return False
        return not (self.exclude is not None and self.exclude.search(path))


def as_selector(filter: str | Selector | Callable[[str], bool] | None) -> Callable[[str], bool]:
    """A path predicate from `filter`: None selects every leaf, a string is an include regular
    expression, a callable is used as is."""
    if filter is None:
        return lambda path: True
    if isinstance(filter, str):
        return Selector(include=filter)
    if not callable(filter):
        raise MergeError(f"filter must be a regular expression over leaf paths or a callable, got "
                         f"{type(filter).__name__}")
    return filter


def check_models(models: Sequence[Any], argument: str = "models", minimum: int = 1) -> None:
    """MergeError unless `models` is a list or tuple of at least `minimum` trees (named `argument`)."""
    if not isinstance(models, (list, tuple)):
        raise MergeError(f"{argument} must be a list of parameter trees, got {type(models).__name__}")
    if len(models) < minimum:
        raise MergeError(f"{argument} needs at least {minimum} model(s), got {len(models)}")


def check_compatible(reference: Any, others: Sequence[Any], names: Sequence[str],
                     reference_name: str = "the reference tree") -> list[str]:
    """ValueError naming the argument and leaf path where trees differ in structure, shape or
    dtype, or hold a leaf that is not an array; returns the leaf paths."""
    ref = leaves_with_paths(reference)
    _check_arrays(ref, reference_name)
    ref_struct = jax.tree.structure(reference)
    paths = [p for p, _ in ref]
    for tree, name in zip(others, names):
        if jax.tree.structure(tree) != ref_struct:
            other_paths = {p for p, _ in leaves_with_paths(tree)}
            missing = sorted(set(paths) - other_paths)[:3]
            extra = sorted(other_paths - set(paths))[:3]
            raise MergeError(f"{name} has a different tree: missing {missing}, unexpected {extra}")
        leaves = leaves_with_paths(tree)
        _check_arrays(leaves, name)
        for (path, a), (_, b) in zip(ref, leaves):
            if tuple(a.shape) != tuple(b.shape):
                raise MergeError(f"{name}: leaf {path!r} has shape {tuple(b.shape)}, expected {tuple(a.shape)}")
            if jnp.dtype(a.dtype) != jnp.dtype(b.dtype):
                raise MergeError(f"{name}: leaf {path!r} has dtype {b.dtype}, expected {a.dtype}")
    return paths


def _check_arrays(leaves: list[tuple[str, Any]], name: str) -> None:
    for path, leaf in leaves:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise MergeError(f"{name}: leaf {path!r} is a {type(leaf).__name__}, not an array")


def leaf_key(key: jax.Array | None, path: str) -> jax.Array | None:
    """A PRNG key for one leaf, derived from its path (independent of traversal order)."""
    if key is None:
        return None
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def check_fraction(value: float, name: str, path: str, low_open=True) -> None:
    """MergeError naming `name` and the leaf unless `value` is in (0, 1] (in [0, 1] when
    `low_open` is False)."""
    ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
    if not ok:
        raise MergeError(f"{name}={value!r} at leaf {path!r} must be in {'(0, 1]' if low_open else '[0, 1]'}")
