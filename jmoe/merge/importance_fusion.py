"""Arcee Fusion, as in mergekit's `arcee_fusion.py`: the base takes the other model's value
only where that change matters. Importance of an entry = |m - base| times the KL divergence
between the softmax of m's row and of the base's row (last axis); entries whose importance
reaches median + 1.5 * IQR of the tensor's importances (the upper outlier fence) take the
model's value, the others keep the base's. mergekit estimates the quartiles from a random
sample of 1M entries for larger tensors; jmoe sorts them all (exact, deterministic)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.merge.methods import _f32, _one_other, map_merge
from jmoe.merge.registry import merge_method


def importance(model, base, eps: float = 1e-8):
    """|model - base| * KL(softmax(model) || softmax(base)) per row (the last axis), float32."""
    p = jax.nn.softmax(model, axis=-1) + eps
    q = jax.nn.softmax(base, axis=-1) + eps
    kl = jnp.sum(p * jnp.log(p / q), axis=-1, keepdims=True)
    return jnp.abs(model - base) * kl


def fence(scores):
    """median + 1.5 * (q3 - q1) of `scores`, each quantile the sorted entry at floor(q * (n - 1))."""
    flat = jnp.sort(scores.reshape(-1))
    at = lambda q: flat[int(jnp.float32(q) * (flat.size - 1))]
    return at(0.5) + 1.5 * (at(0.75) - at(0.25))


@merge_method(mergekit=True, num_models=1)
def arcee_fusion(base, models, *, filter=None, num_layers=None):
    """The base with models[0]'s values where their importance reaches the outlier fence
    (see the module docstring)."""
    _one_other(models, "arcee_fusion")

    def leaf(path, layers, b, xs, _k):
        b32, m32 = _f32(b), _f32(xs[0])
        scores = importance(m32, b32)
        return jnp.where(scores >= fence(scores), m32, b32).astype(jnp.asarray(b).dtype)

    return map_merge(leaf, base, models, filter=filter, num_layers=num_layers)
