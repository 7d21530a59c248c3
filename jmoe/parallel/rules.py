"""Partition rules: regular expressions over parameter paths -> PartitionSpecs.

A path is the tree path joined with "/" (e.g. "layers/3/moe/experts/w_up", or
"opt_state/1/0/mu/layers/3/moe/experts/w_up" for the optimizer's copy), and the first rule
whose pattern `re.search`es it gives the spec. Mesh axes a spec names but the mesh lacks
(or has with size 1) are dropped, and so is any axis whose size does not divide the
dimension it would split, so one rule set serves every mesh.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, P]]

DEFAULT_RULES: Rules = (
    (r"(^|/)experts/w_(gate|up)$", P("expert", "fsdp", "model")),  # [E, d, f]
    (r"(^|/)experts/w_down$", P("expert", "model", "fsdp")),  # [E, f, d]
    (r"(^|/)router/", P()),
    (r"(^|/)(shared|ffn)/w_(gate|up)$", P("fsdp", "model")),  # [d, f]
    (r"(^|/)(shared|ffn)/w_down$", P("model", "fsdp")),  # [f, d]
    (r"(^|/)attn/w[qkv]$", P("fsdp", "model", None)),  # [d, H, Dh]
    (r"(^|/)attn/wo$", P("model", None, "fsdp")),  # [H, Dh, d]
    (r"(^|/)embed/w$", P(None, "fsdp")),  # [V, d]
    (r"(^|/)unembed/w$", P("fsdp", None)),  # [d, V]
    (r".*", P()),
)


def path_str(path) -> str:
    """A `jax.tree_util` key path joined with "/" ("layers/3/moe/experts/w_up")."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    entries = list(spec) + [None] * (len(shape) - len(spec))
    entries = entries[: len(shape)]
    out = []
    for dim, entry in zip(shape, entries):
        names = entry if isinstance(entry, tuple) else (entry,) if entry else ()
        kept = []
        size = 1
        for name in names:
            n = mesh.shape.get(name, 1)
            if n > 1 and dim % (size * n) == 0:
                kept.append(name)
                size *= n
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> P:
    """The PartitionSpec of a leaf: the first rule matching `path`, fitted to `mesh` and `shape`
    (P() if no rule matches)."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            return _fit(spec, tuple(shape), mesh)
    return P()


def partition_specs(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """A tree of PartitionSpecs for the arrays (or ShapeDtypeStructs) of `tree`."""
    return jax.tree_util.tree_map_with_path(lambda p, x: spec_for(path_str(p), x.shape, mesh, rules), tree)


def shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """A tree of NamedShardings on `mesh` for the arrays (or ShapeDtypeStructs) of `tree`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), partition_specs(tree, mesh, rules))


def shard_tree(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Place every array of `tree` on `mesh` by the rules (single-process trees)."""
    return jax.device_put(tree, shardings(tree, mesh, rules))
