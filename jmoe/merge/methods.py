"""Merge methods: pure functions over parameter trees of equal structure.

`method(base, models, **params) -> tree` (base first where the method has one). Trees may be
nested dicts of arrays, `nnx.State` pure dicts, or flat {hf_name: array} dicts. Leaves are
merged one by one in float32 and returned in their own dtype; integer leaves and leaves the
`filter` (a regular expression over leaf paths) leaves out are copied from the base (or the
first model). Scalar parameters may vary over layers (see `jmoe.merge.tree.resolve`).
Methods with randomness take an explicit `key`. Everything is jnp, so methods jit, and
sharded inputs stay sharded.

Task-vector methods share one pipeline, as mergekit's: task vectors d_i = m_i - base, then
  sparsify (magnitude / random / magnitude_outliers / della, per model),
  weight (w_i d_i),
  consensus (optional TIES sign election; disagreeing and pruned entries drop out),
  aggregate (sum, or with normalize the mean weighted by the agreeing models' weights),
and base + lambda * the aggregate.

Each method is registered in `jmoe.merge.registry.MERGE_METHODS` next to its definition, with
its parameters and their names in a mergekit configuration.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jmoe.checks import check_key, is_int
from jmoe.merge import sparsify as sp
from jmoe.merge.registry import Param, as_bool, merge_method
from jmoe.merge.select import kth_largest
from jmoe.merge.tree import (
    MergeError,
    as_selector,
    check_compatible,
    check_fraction,
    check_models,
    leaf_key,
    leaves_with_paths,
    num_layers as count_layers,
    resolve,
)

LeafFn = Callable[[str, int, Any, list, Any], Any]


# ----------------------------------------------------------- parameters of the table


def _rescale(value) -> str | None:
    """mergekit's `rescale` (true, false, "inverse" or "l1") as a DARE rescale mode."""
    if value is True:
        return "inverse"
    if value in (False, None):
        return None
    if value in ("inverse", "l1"):
        return value
    raise MergeError(f"rescale={value!r} must be true, false, 'inverse' or 'l1'")


def _della_rescale(value) -> str | None:
    """mergekit's `rescale` for DELLA: any rescaling restores the L1 norm."""
    return "l1" if _rescale(value) else None


def _disjoint(normalize) -> str:
    """mergekit's TIES `normalize` as a disjoint-merge mode."""
    return "mean" if normalize else "sum"


def _fraction(value) -> str | None:
    """What is wrong with a fraction in (0, 1], or None."""
    return None if 0 < value <= 1 else "must be in (0, 1]"


def _ties_scope(value) -> str | None:
    return None if value in ("tensor", "global") else "must be 'tensor' or 'global'"


WEIGHTS = Param("weights", yaml="weight", per_model=True, layered=True, convert=float)
DENSITY = Param("density", per_model=True, layered=True, convert=float, valid=_fraction, config_default=1.0)
LAMBDA = Param("lam", yaml="lambda", layered=True, convert=float)
NORMALIZE = Param("normalize", convert=as_bool)
RESCALE = Param("rescale", convert=_rescale)
GAMMA = Param("gamma", per_model=True, layered=True, convert=float)
EPSILON = Param("epsilon", per_model=True, layered=True, convert=float)
T = Param("t", layered=True, convert=float)
INT8_MASK = ("int8_mask",)  # mergekit's mask storage option: accepted, no effect here


# ------------------------------------------------------------------------------ driver


def map_merge(leaf_fn: LeafFn, base, models: Sequence, *, filter=None, key=None, min_models: int = 1,
              num_layers: int | None = None) -> Any:
    """Apply `leaf_fn(path, num_layers, base_leaf, model_leaves, leaf_key)` to every selected
    floating leaf; the other leaves are copied from the base (or the first model).

    num_layers: the model's layer count for layer gradients (default: read off the paths;
    pass it when merging a part of a model, e.g. one tensor at a time).
    """
    check_models(models, minimum=min_models)
    ref = base if base is not None else models[0]
    others = list(models) if base is not None else list(models[1:])
    names = [f"models[{i}]" for i in range(len(models))]
    if base is None:
        names = names[1:]
    paths = check_compatible(ref, others, names, reference_name="base" if base is not None else "models[0]")
    total_layers = count_layers(paths) if num_layers is None else num_layers
    select = as_selector(filter)
    ref_leaves = jax.tree.leaves(ref)
    model_leaves = [jax.tree.leaves(m) for m in models]
    out = []
    for j, path in enumerate(paths):
        b = ref_leaves[j]
        if not select(path) or not jnp.issubdtype(jnp.asarray(b).dtype, jnp.floating):
            out.append(b)
            continue
        xs = [ml[j] for ml in model_leaves]
        out.append(leaf_fn(path, total_layers, b if base is not None else None, xs, leaf_key(key, path)))
    return jax.tree.unflatten(jax.tree.structure(ref), out)


def _per_model(value, n: int, name: str) -> list:
    """One parameter value per model: a list or tuple with n entries (not all {filter, value}
    entries) is per model; anything else (a number, a layer gradient, conditional entries) is
    shared by every model. To give each of n models the same n-entry gradient, pass
    [gradient] * n. (Called through `MERGE_METHODS`, a per-model list of another length is
    an error before this is reached.)"""
    if isinstance(value, (list, tuple)) and len(value) == n and not all(isinstance(v, Mapping) for v in value):
        return list(value)
    return [value] * n


def _scalar(value, path, layers, name) -> float:
    v = resolve(value, path, layers, name)
    if v is None:
        raise MergeError(f"{name} has no value for leaf {path!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise MergeError(f"{name}={v!r} at leaf {path!r} is not a number") from None
    if not math.isfinite(f):
        raise MergeError(f"{name}={v!r} at leaf {path!r} is not a finite number")
    return f


def _f32(x):
    return jnp.asarray(x).astype(jnp.float32)


def _aggregate(base, deltas, weights, lam, consensus, normalize):
    wd = jnp.stack([w * d for w, d in zip(weights, deltas)])
    wv = jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * (wd.ndim - 1))
    if consensus is not None:
        mask = sp.sign_consensus(wd, consensus)
        mixed = jnp.sum(jnp.where(mask, wd, 0.0), axis=0)
        divisor = jnp.sum(jnp.where(mask, wv, 0.0), axis=0)
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = jnp.sum(wd, axis=0)
        divisor = jnp.sum(wv, axis=0) * jnp.ones_like(mixed)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    return _f32(base) + lam * mixed


def task_vector_merge(
    base,
    models: Sequence,
    *,
    sparsify: Callable[..., Any] | None = None,
    weights: Any = 1.0,
    lam: Any = 1.0,
    consensus: str | None = None,
    normalize: bool = False,
    filter=None,
    key=None,
    leaf_params: dict[str, Any] | None = None,
    model_params: dict[str, Any] | None = None,
    thresholds: dict | None = None,
    num_layers: int | None = None,
):
    """The shared pipeline: sparsify -> weight -> consensus -> aggregate -> base + lambda * ..

    sparsify(delta, key=..., threshold=..., **resolved model params) -> delta, per model.
    leaf_params: parameters resolved per leaf (same for all models); model_params: per-model
    parameters (a value, or a list with one value per model), resolved per leaf.
    """
    if base is None:
        raise MergeError("base is required for task-vector methods")
    check_models(models)
    n = len(models)
    w_all = _per_model(weights, n, "weights")
    mparams = {k: _per_model(v, n, k) for k, v in (model_params or {}).items()}

    def leaf(path, layers, b, xs, k):
        w = [_scalar(wi, path, layers, "weights") for wi in w_all]
        lam_v = _scalar(lam, path, layers, "lambda")
        deltas = [_f32(x) - _f32(b) for x in xs]
        if sparsify is not None:
            keys = jax.random.split(k, n) if k is not None else [None] * n
            new = []
            for i, d in enumerate(deltas):
                p = {name: _scalar(vals[i], path, layers, name) for name, vals in mparams.items()}
                for name, value in (leaf_params or {}).items():
                    p[name] = _scalar(value, path, layers, name)
                if "density" in p:
                    check_fraction(p["density"], "density", path)
                if "gamma" in p:
                    check_fraction(p["gamma"], "gamma", path, low_open=False)
                t = thresholds[i] if thresholds is not None else None
                new.append(sparsify(d, key=keys[i], threshold=t, **p))
            deltas = new
        out = _aggregate(b, deltas, w, lam_v, consensus, normalize)
        return out.astype(jnp.asarray(b).dtype)

    return map_merge(leaf, base, models, filter=filter, key=key, num_layers=num_layers)


def _needs_key(key, method):
    if key is None:
        raise MergeError(f"{method} is random: pass key=jax.random.key(seed)")
    check_key(key)


# --------------------------------------------------------------------- task arithmetic


@merge_method(WEIGHTS, LAMBDA, NORMALIZE, mergekit=True)
def task_arithmetic(base, models, *, weights=1.0, lam=1.0, normalize=False, filter=None, num_layers=None):
    """base + lambda * sum_i w_i (m_i - base) (normalize: divide by sum_i w_i)."""
    return task_vector_merge(base, models, weights=weights, lam=lam, normalize=normalize, filter=filter,
                             num_layers=num_layers)


@merge_method(DENSITY, WEIGHTS, LAMBDA, Param("disjoint", yaml="normalize", convert=_disjoint),
              Param("scope", valid=_ties_scope),
              Param("thresholds", per_model=True, yaml=False), mergekit=True, ignored=INT8_MASK)
def ties(base, models, *, density, weights=1.0, lam=1.0, consensus="sum", scope="tensor", disjoint="mean", filter=None,
         num_layers=None, thresholds=None):
    """TIES-merging: trim (keep the top `density` of each task vector by magnitude), elect signs,
    disjoint merge.

    scope "tensor" ranks magnitudes within each tensor (mergekit); "global" over the whole
    model (the TIES paper; `thresholds`, one magnitude per model, may be given when the
    whole model is not at hand, see `global_magnitude_thresholds`). disjoint "mean" averages the agreeing entries weighted by their
    models' weights (mergekit, and the paper with equal weights); "sum" adds them.
    """
    if scope not in ("tensor", "global"):
        raise MergeError(f"ties scope={scope!r} must be 'tensor' or 'global'")
    if disjoint not in ("mean", "sum"):
        raise MergeError(f"ties disjoint={disjoint!r} must be 'mean' or 'sum'")
    if scope == "global" and thresholds is None:
        thresholds = global_magnitude_thresholds(base, models, density, filter=filter)
    if scope == "tensor":
        thresholds = None
    return task_vector_merge(
        base, models, weights=weights, lam=lam, consensus=consensus, normalize=disjoint == "mean", filter=filter,
        sparsify=lambda d, key, threshold, density: sp.magnitude(d, density, threshold),
        model_params={"density": density}, thresholds=thresholds, num_layers=num_layers,
    )


def global_magnitude_thresholds(base, models, density, *, filter=None) -> list:
    """Per model, the magnitude of its int(density * N)-th largest task-vector entry over all
    N selected floating entries of the model (the TIES paper's global trim)."""
    check_models(models)
    densities = []
    for d in _per_model(density, len(models), "density"):
        if not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise MergeError(f"density={d!r} must be a number in (0, 1] for global ties (one per model, or shared)")
        densities.append(float(d))
    select = as_selector(filter)
    base_leaves = leaves_with_paths(base)
    out = []
    for m, d in zip(models, densities):
        deltas = [jnp.abs(_f32(x) - _f32(b)) for (p, b), x in zip(base_leaves, jax.tree.leaves(m))
                  if select(p) and jnp.issubdtype(jnp.asarray(b).dtype, jnp.floating)]
        k = int(d * sum(int(x.size) for x in deltas))
        if d >= 1:
            out.append(jnp.float32(0.0))
        else:
            out.append(kth_largest(deltas, k) if k > 0 else jnp.float32(jnp.inf))
    return out


@merge_method(DENSITY, WEIGHTS, LAMBDA)
def dare(base, models, *, density, key, weights=1.0, lam=1.0, rescale="inverse", consensus=None, normalize=False,
         filter=None, num_layers=None):
    """DARE: drop task-vector entries with probability 1 - density and rescale the rest
    (rescale "inverse" = 1 / density, "l1" = restore each tensor's L1 norm)."""
    _needs_key(key, "dare")
    return task_vector_merge(
        base, models, weights=weights, lam=lam, consensus=consensus, normalize=normalize, filter=filter, key=key,
        sparsify=lambda d, key, threshold, density: sp.random(d, density, key, rescale),
        model_params={"density": density}, num_layers=num_layers,
    )


@merge_method(DENSITY, WEIGHTS, LAMBDA, NORMALIZE, RESCALE, mergekit=True, ignored=INT8_MASK)
def dare_ties(base, models, *, density, key, weights=1.0, lam=1.0, rescale="inverse", normalize=False, filter=None,
              num_layers=None):
    """DARE sparsification with TIES sign consensus."""
    return dare(base, models, density=density, key=key, weights=weights, lam=lam, rescale=rescale, consensus="sum",
                normalize=normalize, filter=filter, num_layers=num_layers)


@merge_method(DENSITY, WEIGHTS, LAMBDA, NORMALIZE, RESCALE, mergekit=True)
def dare_linear(base, models, *, density, key, weights=1.0, lam=1.0, rescale="inverse", normalize=False, filter=None,
                num_layers=None):
    """DARE sparsification without sign consensus: the weighted sum of the task vectors."""
    return dare(base, models, density=density, key=key, weights=weights, lam=lam, rescale=rescale, consensus=None,
                normalize=normalize, filter=filter, num_layers=num_layers)


@merge_method(DENSITY, GAMMA, WEIGHTS, LAMBDA, NORMALIZE, mergekit=True)
def breadcrumbs(base, models, *, density, gamma=0.01, weights=1.0, lam=1.0, consensus=None, normalize=False, filter=None, num_layers=None):
    """Model Breadcrumbs: drop the largest `gamma` and the smallest entries of each task
    vector, keeping `density`."""
    return task_vector_merge(
        base, models, weights=weights, lam=lam, consensus=consensus, normalize=normalize, filter=filter,
        sparsify=lambda d, key, threshold, density, gamma: sp.magnitude_outliers(d, density, gamma),
        model_params={"density": density, "gamma": gamma}, num_layers=num_layers,
    )


@merge_method(DENSITY, GAMMA, WEIGHTS, LAMBDA, NORMALIZE, mergekit=True, ignored=INT8_MASK)
def breadcrumbs_ties(base, models, *, density, gamma=0.01, weights=1.0, lam=1.0, normalize=False, filter=None,
                     num_layers=None):
    """Model Breadcrumbs sparsification with TIES sign consensus."""
    return breadcrumbs(base, models, density=density, gamma=gamma, weights=weights, lam=lam, consensus="sum",
                       normalize=normalize, filter=filter, num_layers=num_layers)


@merge_method(DENSITY, EPSILON, WEIGHTS, LAMBDA, NORMALIZE, Param("rescale", convert=_della_rescale), mergekit=True,
              ignored=INT8_MASK)
def della(base, models, *, density, key, epsilon=0.15, weights=1.0, lam=1.0, rescale="l1", consensus="sum",
          normalize=True, filter=None, num_layers=None):
    """DELLA: magnitude-ranked random drop (MagPrune), TIES consensus, weighted mean."""
    _needs_key(key, "della")
    return task_vector_merge(
        base, models, weights=weights, lam=lam, consensus=consensus, normalize=normalize, filter=filter, key=key,
        sparsify=lambda d, key, threshold, density, epsilon: sp.della(d, density, epsilon, key, rescale),
        model_params={"density": density, "epsilon": epsilon}, num_layers=num_layers,
    )


@merge_method(DENSITY, EPSILON, WEIGHTS, LAMBDA, NORMALIZE, Param("rescale", convert=_della_rescale), mergekit=True)
def della_linear(base, models, *, density, key, epsilon=0.15, weights=1.0, lam=1.0, rescale="l1", normalize=False,
                 filter=None, num_layers=None):
    """DELLA sparsification without sign consensus: the weighted sum of the task vectors."""
    return della(base, models, density=density, key=key, epsilon=epsilon, weights=weights, lam=lam, rescale=rescale,
                 consensus=None, normalize=normalize, filter=filter, num_layers=num_layers)


# ---------------------------------------------------------------------- interpolations


@merge_method(WEIGHTS, NORMALIZE, mergekit=True)
def linear(models, *, weights=1.0, normalize=True, filter=None, num_layers=None):
    """sum_i w_i m_i (normalize: divided by sum_i w_i). No base."""
    check_models(models)
    w_all = _per_model(1.0 if weights is None else weights, len(models), "weights")

    def leaf(path, layers, _b, xs, _k):
        w = [_scalar(wi, path, layers, "weights") for wi in w_all]
        out = sum(wi * _f32(x) for wi, x in zip(w, xs))
        if normalize:
            total = sum(w)
            if abs(total) < 1e-12:
                raise MergeError(f"weights sum to 0 at leaf {path!r}; cannot normalize")
            out = out / total
        return out.astype(jnp.asarray(xs[0]).dtype)

    return map_merge(leaf, None, models, filter=filter, num_layers=num_layers)


def _one_other(models, method):
    if not isinstance(models, (list, tuple)) or len(models) != 1:
        raise MergeError(f"{method} merges the base with exactly one other model: pass models=[other]")


@merge_method(T, mergekit=True, num_models=1)
def slerp(base, models, *, t, eps=1e-8, dot_threshold=0.9995, filter=None, num_layers=None):
    """Spherical interpolation of each tensor (flattened) from base (t=0) to models[0]
    (t=1); nearly parallel (or anti-parallel) tensors are interpolated linearly."""
    _one_other(models, "slerp")

    def leaf(path, layers, b, xs, _k):
        tv = _scalar(t, path, layers, "t")
        v0, v1 = _f32(b), _f32(xs[0])
        n0, n1 = jnp.linalg.norm(v0), jnp.linalg.norm(v1)
        u0 = jnp.where(n0 > eps, v0 / jnp.where(n0 > eps, n0, 1.0), v0)
        u1 = jnp.where(n1 > eps, v1 / jnp.where(n1 > eps, n1, 1.0), v1)
        dot = jnp.clip(jnp.sum(u0 * u1), -1.0, 1.0)
        theta = jnp.arccos(dot)
        sin = jnp.sin(theta)
        safe = jnp.where(jnp.abs(dot) > dot_threshold, 1.0, sin)
        s0 = jnp.sin(theta * (1 - tv)) / safe
        s1 = jnp.sin(theta * tv) / safe
        res = jnp.where(jnp.abs(dot) > dot_threshold, (1 - tv) * v0 + tv * v1, s0 * v0 + s1 * v1)
        return res.astype(jnp.asarray(b).dtype)

    return map_merge(leaf, base, models, filter=filter, num_layers=num_layers)


@merge_method(T, mergekit=True, num_models=1)
def nearswap(base, models, *, t, filter=None, num_layers=None):
    """Take models[0]'s value where it is within t of the base's; farther entries move toward
    it with weight t / |base - other| (NearSwap)."""
    _one_other(models, "nearswap")

    def leaf(path, layers, b, xs, _k):
        tv = _scalar(t, path, layers, "t")
        if tv <= 0:
            raise MergeError(f"nearswap t={tv} at leaf {path!r} must be > 0")
        v0, v1 = _f32(b), _f32(xs[0])
        diff = jnp.abs(v0 - v1)
        w = jnp.clip(jnp.where(diff > 0, tv / jnp.where(diff > 0, diff, 1.0), 1.0), 0.0, 1.0)
        return (w * v1 + (1 - w) * v0).astype(jnp.asarray(b).dtype)

    return map_merge(leaf, base, models, filter=filter, num_layers=num_layers)


@merge_method(Param("filter_wise", convert=as_bool), mergekit=True)
def model_stock(base, models, *, filter_wise=False, filter=None, num_layers=None):
    """Model Stock: t = N cos / (1 + (N - 1) cos) from the mean pairwise cosine of the task
    vectors (per tensor, or per row with filter_wise); result t * mean(models) + (1 - t) *
    base. Needs at least 2 fine-tunes."""
    check_models(models, minimum=2)

    def leaf(path, layers, b, xs, _k):
        w0 = _f32(b)
        ws = [_f32(x) for x in xs]
        rowwise = filter_wise and w0.ndim >= 2
        rows = (lambda a: a.reshape(-1, a.shape[-1])) if rowwise else (lambda a: a.reshape(1, -1))
        offs = [rows(w - w0) for w in ws]
        cos = []
        for i in range(len(offs)):
            for j in range(i + 1, len(offs)):
                num = jnp.sum(offs[i] * offs[j], axis=-1)
                den = jnp.maximum(jnp.linalg.norm(offs[i], axis=-1) * jnp.linalg.norm(offs[j], axis=-1), 1e-6)
                cos.append(jnp.clip(num / den, -1.0, 1.0))
        c = jnp.mean(jnp.stack(cos), axis=0)
        N = len(ws)
        t = N * c / (1 + (N - 1) * c)
        t = t.reshape(w0.shape[:-1] + (1,)) if rowwise else t.reshape(())
        return (t * (sum(ws) / N) + (1 - t) * w0).astype(jnp.asarray(b).dtype)

    return map_merge(leaf, base, models, filter=filter, num_layers=num_layers)


@merge_method(Param("select_topk", layered=True, convert=float), mergekit=True, ignored=INT8_MASK)
def sce(base, models, *, select_topk=1.0, filter=None, num_layers=None):
    """SCE: select the entries whose task vectors vary most across models (top select_topk
    by variance), weight models by their mean squared task vector, erase entries disagreeing
    with the summed sign, and take the weighted mean."""
    check_models(models)

    def leaf(path, layers, b, xs, _k):
        frac = _scalar(select_topk, path, layers, "select_topk")
        check_fraction(frac, "select_topk", path, low_open=False)
        d = jnp.stack([_f32(x) - _f32(b) for x in xs])
        if frac < 1:
            var = jnp.var(d, axis=0)
            nonzero = jnp.sum(var != 0)
            k = jnp.floor(frac * nonzero).astype(jnp.int32)
            order = jnp.argsort(-jnp.abs(var).reshape(-1))
            rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size))
            keep = (rank < k).reshape(var.shape)
            d = jnp.where(keep, d, 0.0)
        w = jnp.sum(d.reshape(len(xs), -1) ** 2, axis=1) / d[0].size
        w = jnp.where(jnp.sum(w) > 0, w / jnp.where(jnp.sum(w) > 0, jnp.sum(w), 1.0), jnp.full_like(w, 1.0 / len(xs)))
        elected = jnp.where(jnp.sum(d, axis=0) >= 0, 1.0, -1.0)
        erase = jnp.sign(d) == elected
        wv = w.reshape((-1,) + (1,) * (d.ndim - 1))
        num = jnp.sum(jnp.where(erase, wv * d, 0.0), axis=0)
        den = jnp.sum(jnp.where(erase, wv, 0.0), axis=0)
        return (_f32(b) + num / jnp.where(den == 0, 1.0, den)).astype(jnp.asarray(b).dtype)

    return map_merge(leaf, base, models, filter=filter, num_layers=num_layers)


@merge_method(Param("max_iter", convert=int), Param("tol", convert=float), mergekit=True)
def karcher(models, *, max_iter=10, tol=1e-5, filter=None, num_layers=None):
    """Karcher (Riemannian) mean of the tensors' directions on the sphere, scaled by their
    mean norm. No base."""
    check_models(models)
    if not is_int(max_iter) or max_iter < 1:
        raise MergeError(f"karcher max_iter={max_iter!r} must be an integer >= 1")
    if not tol > 0:
        raise MergeError(f"karcher tol={tol!r} must be > 0")

    def leaf(path, layers, _b, xs, _k):
        x = jnp.stack([_f32(v).reshape(-1) for v in xs])
        n = x.shape[0]
        alpha = jnp.full((n,), 1.0 / n)
        norms = jnp.linalg.norm(x, axis=1)
        valid = norms > tol
        u = jnp.where(valid[:, None], x / jnp.where(valid, norms, 1.0)[:, None], 0.0)
        a = jnp.where(valid, alpha, 0.0)
        a = a / jnp.maximum(jnp.sum(a), 1e-12)
        mean = jnp.sum(a[:, None] * u, axis=0)
        mnorm = jnp.linalg.norm(mean)
        first_valid = u[jnp.argmax(valid)]
        m = jnp.where(mnorm < tol, first_valid, mean / jnp.where(mnorm < tol, 1.0, mnorm))

        def body(_, m):
            cos = jnp.clip(u @ m, -1.0, 1.0)
            theta = jnp.arccos(cos)
            coef = jnp.where(theta > tol, theta / jnp.where(theta > tol, jnp.sin(theta), 1.0), 0.0)
            T = jnp.sum((a * coef)[:, None] * (u - cos[:, None] * m[None, :]), axis=0)
            tn = jnp.linalg.norm(T)
            step = jnp.cos(tn) * m + jnp.sin(tn) * T / jnp.where(tn > 0, tn, 1.0)
            step = step / jnp.linalg.norm(step)
            return jnp.where(tn < tol, m, step)

        m = jax.lax.fori_loop(0, max_iter, body, m)
        out = jnp.sum(alpha * norms) * m
        out = jnp.where(jnp.any(valid), out, 0.0)
        return out.reshape(jnp.shape(xs[0])).astype(jnp.asarray(xs[0]).dtype)

    return map_merge(leaf, None, models, filter=filter, num_layers=num_layers)


@merge_method(Param("scale", per_model=True, layered=True, convert=float), mergekit=True, num_models=1)
def passthrough(models, *, scale=1.0, filter=None, num_layers=None):
    """models[0] as it is (its floating leaves times `scale`): mergekit's passthrough, which
    stacks layer ranges of models with `slices`. No base."""
    if not isinstance(models, (list, tuple)) or len(models) != 1:
        raise MergeError("passthrough takes exactly one model: pass models=[model]")
    s_all = _per_model(scale, 1, "scale")

    def leaf(path, layers, _b, xs, _k):
        s = _scalar(s_all[0], path, layers, "scale")
        return xs[0] if s == 1 else (_f32(xs[0]) * s).astype(jnp.asarray(xs[0]).dtype)

    return map_merge(leaf, None, models, filter=filter, num_layers=num_layers)


# ------------------------------------------------------------------------- layer swap


@merge_method()
def layer_swap(base, donor, *, bottom: int = 0, top: int = 0, transition: int = 0, filter=None, num_layers=None):
    """`base` with its `bottom` first and `top` last layers taken from `donor` (layer
    swapping for cross-lingual transfer). `transition` layers next to each swapped block are
    blended linearly from donor to base. Leaves outside the layer stack stay the base's."""
    from jmoe.merge.tree import layer_of

    if min(bottom, top, transition) < 0:
        raise MergeError("bottom, top and transition must be >= 0")
    paths = [p for p, _ in leaves_with_paths(base)]
    L = count_layers(paths) if num_layers is None else num_layers
    if bottom + top > L:
        raise MergeError(f"bottom={bottom} + top={top} exceeds the {L} layers")

    def donor_share(layer):
        if layer < bottom or layer >= L - top:
            return 1.0
        shares = [0.0]
        if bottom and transition:
            d = layer - bottom + 1  # 1 for the first layer after the block
            if d <= transition:
                shares.append(1 - d / (transition + 1))
        if top and transition:
            d = (L - top) - layer
            if d <= transition:
                shares.append(1 - d / (transition + 1))
        return max(shares)

    def leaf(path, layers, b, xs, _k):
        layer = layer_of(path)
        if layer is None:
            return b
        s = donor_share(layer)
        if s == 0:
            return b
        if s == 1:
            return xs[0]
        return (s * _f32(xs[0]) + (1 - s) * _f32(b)).astype(jnp.asarray(b).dtype)

    return map_merge(leaf, base, [donor], filter=filter, num_layers=num_layers)


__all__ = [
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "global_magnitude_thresholds",
    "karcher",
    "layer_swap",
    "linear",
    "map_merge",
    "model_stock",
    "nearswap",
    "passthrough",
    "sce",
    "slerp",
    "task_arithmetic",
    "task_vector_merge",
    "ties",
]
