"""mergekit's spherical interpolations beyond SLERP: Multi-SLERP (barycentric interpolation of
any number of models on a hypersphere) and NuSLERP (SLERP by model weights, row- or
column-wise). Both take an optional base: with one, they interpolate the task vectors
m_i - base and add the base back. Formulas as in mergekit's `multislerp.py` and `nuslerp.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.merge.methods import WEIGHTS, _f32, _per_model, _scalar, map_merge
from jmoe.merge.registry import Param, as_bool, merge_method
from jmoe.merge.tree import MergeError, check_models


@merge_method(WEIGHTS, Param("normalize_weights", convert=as_bool), Param("eps", convert=float), mergekit=True,
              optional_base=True)
def multislerp(base, models, *, weights, normalize_weights=True, eps=1e-8, filter=None, num_layers=None):
    """Multi-SLERP: each (flattened) tensor, or task vector m_i - base when a base is given,
    goes to the unit sphere; their weighted mean direction is the tangent point; the weighted
    mean of the tangent vectors there is mapped back by the exponential map and scaled by the
    weighted mean norm. Weights are normalised to sum to 1 unless normalize_weights=False.
    Two antipodal tensors of equal weight fall back to their weighted sum; more tensors whose
    weighted directions cancel are an error."""
    check_models(models)
    n = len(models)
    w_all = _per_model(weights, n, "weights")

    def leaf(path, layers, b, xs, _k):
        if n == 1:
            return xs[0]
        w = jnp.asarray([_scalar(wi, path, layers, "weights") for wi in w_all], jnp.float32)
        if normalize_weights:
            if abs(float(jnp.sum(w))) < 1e-12:
                raise MergeError(f"multislerp: weights sum to 0 at leaf {path!r}; cannot normalize")
            w = w / jnp.sum(w)
        t = jnp.stack([_f32(x) for x in xs])
        if b is not None:
            t = t - _f32(b)
        flat = t.reshape(n, -1)
        norms = jnp.linalg.norm(flat, axis=-1, keepdims=True)
        unit = flat / (norms + eps)
        mean = jnp.sum(unit * w[:, None], axis=0)
        mean_norm = jnp.linalg.norm(mean)
        if n > 2 and not isinstance(mean_norm, jax.core.Tracer) and float(mean_norm) < eps:
            raise MergeError(f"multislerp: the weighted directions of leaf {path!r} cancel out (antipodal tensors "
                             "with balancing weights); change the weights")
        mean = mean / jnp.where(mean_norm < eps, 1.0, mean_norm)
        tangent = unit - jnp.sum(unit * mean, axis=-1, keepdims=True) * mean
        tangent_sum = jnp.sum(tangent * w[:, None], axis=0)
        tn = jnp.linalg.norm(tangent_sum) + eps
        res = (mean * jnp.cos(tn) + tangent_sum * (jnp.sin(tn) / tn)) * jnp.sum(norms[:, 0] * w)
        res = jnp.where(mean_norm < eps, jnp.sum(flat * w[:, None], axis=0), res).reshape(t.shape[1:])
        if b is not None:
            res = res + _f32(b)
        return res.astype(jnp.asarray(xs[0]).dtype)

    return map_merge(leaf, base, models, filter=filter, num_layers=num_layers)


def nuslerp_tensors(t: float, v0, v1, *, row_wise: bool = False, flatten: bool = True, eps: float = 1e-8):
    """SLERP from v0 (t=0) to v1 (t=1): of the flattened tensors, or (flatten=False) of each
    row (the last axis), or with row_wise of each vector along the first axis; (nearly)
    colinear vectors are interpolated linearly."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = jnp.swapaxes(v0, 0, -1), jnp.swapaxes(v1, 0, -1)
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-7)
    cos = jnp.sum(unit(v0) * unit(v1), axis=-1, keepdims=True)
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.sin(theta)
    colinear = jnp.abs(sin) < eps
    safe = jnp.where(colinear, 1.0, sin)
    res = jnp.where(colinear, (1 - t) * v0 + t * v1, (jnp.sin((1 - t) * theta) * v0 + jnp.sin(t * theta) * v1) / safe)
    if row_wise and not flatten:
        res = jnp.swapaxes(res, 0, -1)
    return res.reshape(shape)


@merge_method(WEIGHTS, Param("row_wise", yaml="nuslerp_row_wise", convert=as_bool),
              Param("flatten", yaml="nuslerp_flatten", convert=as_bool), mergekit=True, num_models=2, optional_base=True)
def nuslerp(base, models, *, weights, row_wise=False, flatten=True, filter=None, num_layers=None):
    """NuSLERP: SLERP between two models at t = w_1 / (w_0 + w_1) (0.5 when the weights sum
    to zero), of the task vectors m_i - base when a base is given; flatten=False interpolates
    row by row (row_wise: along the first axis instead)."""
    if not isinstance(models, (list, tuple)) or len(models) != 2:
        raise MergeError("nuslerp merges exactly two models (plus an optional base): pass models=[a, b]")
    w_all = _per_model(weights, 2, "weights")

    def leaf(path, layers, b, xs, _k):
        w0, w1 = (_scalar(wi, path, layers, "weights") for wi in w_all)
        t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
        v0, v1 = _f32(xs[0]), _f32(xs[1])
        if b is None:
            res = nuslerp_tensors(t, v0, v1, row_wise=row_wise, flatten=flatten)
        else:
            res = _f32(b) + nuslerp_tensors(t, v0 - _f32(b), v1 - _f32(b), row_wise=row_wise, flatten=flatten)
        return res.astype(jnp.asarray(xs[0]).dtype)

    return map_merge(leaf, base, models, filter=filter, num_layers=num_layers)
