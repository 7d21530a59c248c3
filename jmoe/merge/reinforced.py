"""RAM, Reinforced Agent Merging (arXiv 2601.13572), as in mergekit's `ram.py`: task-vector
entries that only one model changes are kept whole, entries several models change are
averaged over those models (plain task arithmetic would add them up). RAM+ (tensor-local)
also scales each model's unique entries up by 1 + r * min(alpha, shared / unique), its
counts of shared and unique changed entries in the tensor."""

from __future__ import annotations

from numbers import Real

import jax.numpy as jnp

from jmoe.merge.methods import _f32, map_merge
from jmoe.merge.registry import Param, merge_method
from jmoe.merge.tree import MergeError, check_models

EPSILON = Param("epsilon", convert=float)


def _changed(b, xs, epsilon):
    """(task vectors [n, ...] with unchanged entries zeroed, which entries changed, how many
    models changed each entry)."""
    tv = jnp.stack([_f32(x) - _f32(b) for x in xs])
    changed = jnp.abs(tv) > epsilon
    return jnp.where(changed, tv, 0.0), changed, jnp.sum(changed, axis=0)


def _merge(base, models, epsilon, scale, filter, num_layers, method):
    if base is None:
        raise MergeError(f"base is required for {method} (it merges task vectors m_i - base)")
    check_models(models)
    if isinstance(epsilon, bool) or not (isinstance(epsilon, Real) and epsilon >= 0):
        raise MergeError(f"{method} epsilon={epsilon!r} must be a number >= 0")

    def leaf(path, layers, b, xs, _k):
        tv, changed, count = _changed(b, xs, epsilon)
        unique = count == 1
        shared = count > 1
        per_model = scale(changed, unique, shared).reshape((-1,) + (1,) * (tv.ndim - 1))
        merged = jnp.sum(jnp.where(unique, tv * per_model, 0.0) + jnp.where(shared, tv / jnp.maximum(count, 1), 0.0),
                         axis=0)
        return (_f32(b) + merged).astype(jnp.asarray(b).dtype)

    return map_merge(leaf, base, models, filter=filter, num_layers=num_layers)


@merge_method(EPSILON, mergekit=True)
def ram(base, models, *, epsilon=1e-5, filter=None, num_layers=None):
    """RAM: base + sum over entries of the task vectors, an entry changed (|delta| > epsilon)
    by one model taken whole, by several models averaged over them."""
    return _merge(base, models, epsilon, lambda changed, unique, shared: jnp.ones(changed.shape[0]), filter,
                  num_layers, "ram")


@merge_method(Param("r", convert=float), Param("alpha", convert=float), EPSILON, mergekit=True)
def ramplus_tl(base, models, *, r=0.1, alpha=0.2, epsilon=1e-5, filter=None, num_layers=None):
    """RAM+ (tensor-local): RAM with model i's unique entries scaled by
    1 + r * clip(shared_i / unique_i, 0, alpha), from its counts of changed entries that other
    models change too (shared) and that only it changes (unique) in the tensor."""

    def scale(changed, unique, shared):
        n = changed.shape[0]
        flat = lambda m: m.reshape(n, -1)
        shared_i = jnp.sum(flat(changed & shared), axis=1)
        unique_i = jnp.sum(flat(changed & unique), axis=1)
        rho = shared_i / jnp.maximum(unique_i, epsilon)
        return 1 + r * jnp.clip(rho, 0.0, alpha)

    return _merge(base, models, epsilon, scale, filter, num_layers, "ramplus_tl")
