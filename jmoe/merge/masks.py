"""Merges that decide, entry by entry, which task vectors to trust: TALL masks and
consensus merging (Wang et al., 2024) and PCB-merging (Du et al., 2024).

tall_masks: task t keeps the entries where its task vector dominates the rest of the merged
  vector, |tau_t| > lam |tau_MTL - tau_t| (tau_MTL: the merged task vector, by default the
  task-arithmetic sum).
consensus: tau_MTL restricted to entries that at least k tasks' TALL masks keep (k = 2
  removes "selfish" entries, k = 1 only "catastrophic" ones), then base + scale * that.
pcb: per task, magnitudes clipped at their `clip` quantiles; intra-balancing
  exp(n * minmax(|tau|)^2) times inter-balancing tanh(tau * sum_j tau_j); only the top
  `ratio` of these scores survive (min-max rescaled); the clipped task vectors are averaged
  with those scores as weights. Quantiles are over each whole model, as in the reference.
"""

from __future__ import annotations

from numbers import Real
from typing import Sequence

import jax
import jax.numpy as jnp

from jmoe.merge.methods import _f32, map_merge
from jmoe.merge.registry import merge_method
from jmoe.merge.select import kth_largest
from jmoe.merge.tree import MergeError, as_selector, check_compatible, check_models, leaves_with_paths


def _deltas(base, models, filter):
    check_models(models)
    paths = check_compatible(base, list(models), [f"models[{i}]" for i in range(len(models))])
    select = as_selector(filter)
    base_leaves = jax.tree.leaves(base)
    chosen = [j for j, (p, b) in enumerate(zip(paths, base_leaves)) if select(p) and jnp.issubdtype(jnp.asarray(b).dtype, jnp.floating)]
    deltas = [[_f32(jax.tree.leaves(m)[j]) - _f32(base_leaves[j]) for j in chosen] for m in models]
    return paths, chosen, deltas


def tall_masks(base, models: Sequence, *, lam: float = 0.4, merged=None, filter=None) -> list:
    """One boolean tree per task: entries where |tau_t| > lam |tau_MTL - tau_t|.

    merged: the merged model whose task vector is tau_MTL (default: base + sum_t tau_t).
    Leaves outside `filter` (and integer leaves) are all True.
    """
    if isinstance(lam, bool) or not (isinstance(lam, Real) and lam >= 0):
        raise MergeError(f"lam={lam!r} must be a number >= 0")
    paths, chosen, deltas = _deltas(base, models, filter)
    if merged is not None:
        check_compatible(base, [merged], ["merged"])
        mtl = [_f32(jax.tree.leaves(merged)[j]) - _f32(jax.tree.leaves(base)[j]) for j in chosen]
    else:
        mtl = [sum(d[i] for d in deltas) for i in range(len(chosen))]
    out = []
    base_leaves = jax.tree.leaves(base)
    for d in deltas:
        leaves = [jnp.ones(jnp.shape(b), bool) for b in base_leaves]
        for i, j in enumerate(chosen):
            leaves[j] = jnp.abs(d[i]) > lam * jnp.abs(mtl[i] - d[i])
        out.append(jax.tree.unflatten(jax.tree.structure(base), leaves))
    return out


@merge_method()
def consensus(base, models: Sequence, *, k: int = 2, lam: float = 0.4, scale: float = 1.0, merged=None, filter=None):
    """Consensus merging: base + scale * (tau_MTL where at least k TALL masks agree)."""
    if k < 0:
        raise MergeError(f"consensus k={k} must be >= 0")
    masks = tall_masks(base, models, lam=lam, merged=merged, filter=filter)
    counts = [sum(jax.tree.leaves(m)[j].astype(jnp.int32) for m in masks) for j in range(len(jax.tree.leaves(base)))]
    mtl_tree = merged

    def leaf(path, layers, b, xs, _k):
        j = index[path]
        if mtl_tree is not None:
            tv = _f32(jax.tree.leaves(mtl_tree)[j]) - _f32(b)
        else:
            tv = sum(_f32(x) - _f32(b) for x in xs)
        return (_f32(b) + scale * jnp.where(counts[j] >= k, tv, 0.0)).astype(jnp.asarray(b).dtype)

    index = {p: j for j, (p, _) in enumerate(leaves_with_paths(base))}
    return map_merge(leaf, base, models, filter=filter)


@merge_method()
def pcb(base, models: Sequence, *, ratio: float = 0.1, clip: float = 1e-4, filter=None):
    """PCB-merging (Parameter Competition Balancing)."""
    if not 0 < ratio <= 1:
        raise MergeError(f"pcb ratio={ratio!r} must be in (0, 1]")
    if not 0 <= clip < 0.5:
        raise MergeError(f"pcb clip={clip!r} must be in [0, 0.5)")
    paths, chosen, deltas = _deltas(base, models, filter)
    n = len(models)
    total = sum(int(x.size) for x in deltas[0])

    def quantile_high(arrays, q):  # value with a fraction q of entries at or above it
        return kth_largest(arrays, max(1, min(total, int(round(q * total)))))

    lows, highs = [], []
    for d in deltas:
        a = [jnp.abs(x) for x in d]
        highs.append(quantile_high(a, clip) if clip > 0 else max(jnp.max(x) for x in a))
        lows.append(quantile_high(a, 1 - clip) if clip > 0 else min(jnp.min(x) for x in a))
    summed = [sum(d[i] for d in deltas) for i in range(len(chosen))]

    def score(t, i):
        a = jnp.clip(jnp.abs(deltas[t][i]), lows[t], highs[t])
        span = jnp.maximum(highs[t] - lows[t], 1e-12)
        intra = jnp.exp(n * ((a - lows[t]) / span) ** 2)
        inter = jnp.tanh(deltas[t][i] * summed[i])
        return intra * inter

    thresholds, tops = [], []
    for t in range(n):
        b = [score(t, i) for i in range(len(chosen))]
        thresholds.append(quantile_high(b, ratio))
        tops.append(max(jnp.max(x) for x in b))
    pos = {j: i for i, j in enumerate(chosen)}

    def leaf(path, layers, base_leaf, xs, _k):
        i = pos[index[path]]
        num, den = 0.0, 0.0
        for t in range(n):
            s = jnp.clip(score(t, i), thresholds[t], None)
            s = (s - thresholds[t]) / jnp.maximum(tops[t] - thresholds[t], 1e-12)
            clipped = jnp.sign(deltas[t][i]) * jnp.clip(jnp.abs(deltas[t][i]), lows[t], highs[t])
            num = num + clipped * s
            den = den + s
        return (_f32(base_leaf) + num / jnp.maximum(den, 1e-12)).astype(jnp.asarray(base_leaf).dtype)

    index = {p: j for j, p in enumerate(paths)}
    return map_merge(leaf, base, models, filter=filter)
