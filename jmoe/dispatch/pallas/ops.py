"""The Pallas ops of the dropless hot path, with APIs that mirror their XLA references.

  gmm(lhs [m, k], rhs [G, k, n], group_sizes [G]) -> [m, n]    like jax.lax.ragged_dot
  qgmm(lhs [m, k], rhs QuantizedArray [G, k, n], group_sizes)    gmm reading quantized weights
  tgmm(lhs [m, k], rhs [m, n], group_sizes [G]) -> [G, k, n]   the weight gradient
  permute_tokens(x [T, d], order [T*k], k) -> [T*k, d]          x[order // k]
  combine_tokens(ys [T*k, d], order, weights [T, k]) -> [T, d]  unsort + weighted sum over k

`gmm` and the two token ops carry custom VJPs made of the same kernels (gmm backward is a
transposed-rhs gmm and a tgmm; permute backward is a combine with unit weights; combine
backward is a permute). `backend` picks the kernel family: "gpu" (Triton lowering) or
"tpu" (Mosaic lowering); by default the one of the current backend, and on CPU the GPU
kernels run in Pallas interpret mode (that is how the tests check them).

Tile sizes come from an explicit `tiling`, else from the `tilings` table (a
`jmoe.dispatch.pallas.tiling.TilingTable`; by default the built-in heuristic); gmm's backward
looks its own tilings up in the same table.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jmoe.dispatch.pallas import gmm_gpu, gmm_tpu, qgmm_gpu, rows
from jmoe.dispatch.pallas.tiling import DEFAULT_TILINGS, Tiling, TilingTable
from jmoe.dispatch.sorting import inverse_permutation
from jmoe.quant.qarray import QuantizedArray

BACKENDS = ("gpu", "tpu")


def default_backend() -> str:
    """The kernel family for the current JAX backend: "tpu" on TPU, "gpu" otherwise."""
    return "tpu" if jax.default_backend() == "tpu" else "gpu"


def default_interpret() -> bool:
    """Whether kernels run in Pallas interpret mode by default (on CPU)."""
    return jax.default_backend() == "cpu"


def _resolve(backend, interpret):
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    return backend, default_interpret() if interpret is None else bool(interpret)


def _check_tilings(tilings):
    if not isinstance(tilings, TilingTable):
        raise TypeError(f"tilings must be a TilingTable, got {type(tilings).__name__} (one tile: pass tiling=)")
    return tilings


def _pad_to(a, axis, multiple):
    rem = a.shape[axis] % multiple
    if rem == 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, multiple - rem)
    return jnp.pad(a, pad)


def _check_grouped(lhs, rhs, group_sizes, transpose_rhs):
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be [m, k], got shape {tuple(lhs.shape)}")
    if rhs.ndim != 3:
        raise ValueError(f"rhs must be [groups, k, n], got shape {tuple(rhs.shape)}")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be a 1-d integer array, got {group_sizes.dtype}{tuple(group_sizes.shape)}")
    k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k_rhs:
        raise ValueError(f"lhs has k={lhs.shape[1]} but rhs has k={k_rhs} (transpose_rhs={transpose_rhs})")


def _rows_in_local_groups(m, group_sizes, group_offset, num_local):
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes.astype(jnp.int32)
    first = starts[group_offset]
    last = ends[group_offset + num_local - 1]
    r = jnp.arange(m)
    return (r >= first) & (r < last)


# ------------------------------------------------------------------------------------ gmm


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    group_offset: int | jax.Array = 0,
    tiling: Tiling | None = None,
    tilings: TilingTable = DEFAULT_TILINGS,
    preferred_element_type=None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Grouped matmul: rows of group g (rows sorted by group) times rhs[g - group_offset].

    Args:
      lhs: [m, k]; rows past sum(group_sizes) give zero rows.
      rhs: [G_local, k, n] (or [G_local, n, k] with transpose_rhs): the groups
        [group_offset, group_offset + G_local) of the G in group_sizes (expert sharding).
      group_sizes: [G] int rows per group.
      tiling: (tm, tk, tn) of this call (default: looked up in `tilings`).
      tilings: the table the tilings of this call (without `tiling`) and of its backward come from.
    Returns:
      [m, n] in preferred_element_type (default lhs's dtype), accumulated in float32; rows of
      groups outside this rhs shard are zero.
    """
    _check_grouped(lhs, rhs, group_sizes, transpose_rhs)
    backend, interpret = _resolve(backend, interpret)
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    tilings = _check_tilings(tilings)
    tiling = tuple(tiling or tilings.get(backend, m, k, n, group_sizes.shape[0], lhs.dtype))
    static = (transpose_rhs, tiling, tilings, out_dtype.name, backend, interpret)
    goff = jnp.asarray(group_offset, jnp.int32)
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), goff, static)


def _gmm_impl(lhs, rhs, group_sizes, goff, static):
    transpose_rhs, tiling, _, out_dtype, backend, interpret = static
    tm, tk, tn = tiling
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    lhs_p = _pad_to(_pad_to(lhs, 0, tm), 1, tk)
    rhs_p = _pad_to(_pad_to(rhs, 2 if transpose_rhs else 1, tk), 1 if transpose_rhs else 2, tn)
    rhs_p = rhs_p.astype(lhs.dtype)
    kernel = gmm_tpu.gmm_tpu if backend == "tpu" else gmm_gpu.gmm_gpu
    out = kernel(lhs_p, rhs_p, group_sizes, goff, tiling=tiling, transpose_rhs=transpose_rhs,
                 out_dtype=jnp.dtype(out_dtype), interpret=interpret)
    keep = _rows_in_local_groups(out.shape[0], group_sizes, goff, rhs.shape[0])
    out = jnp.where(keep[:, None], out, 0)
    return out[:m, :n]


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(lhs, rhs, group_sizes, goff, static):
    return _gmm_impl(lhs, rhs, group_sizes, goff, static)


def _gmm_fwd(lhs, rhs, group_sizes, goff, static):
    return _gmm_impl(lhs, rhs, group_sizes, goff, static), (lhs, rhs, group_sizes, goff)


def _gmm_bwd(static, res, g):
    transpose_rhs, _, tilings, out_dtype, backend, interpret = static
    lhs, rhs, group_sizes, goff = res
    g = g.astype(lhs.dtype)
    kw = dict(tilings=tilings, backend=backend, interpret=interpret)
    dlhs = gmm(g, rhs, group_sizes, transpose_rhs=not transpose_rhs, group_offset=goff,
               preferred_element_type=lhs.dtype, **kw)
    if transpose_rhs:
        drhs = tgmm(g, lhs, group_sizes, group_offset=goff, num_groups=rhs.shape[0],
                    preferred_element_type=rhs.dtype, **kw)
    else:
        drhs = tgmm(lhs, g, group_sizes, group_offset=goff, num_groups=rhs.shape[0],
                    preferred_element_type=rhs.dtype, **kw)
    return dlhs, drhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def tgmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: int | jax.Array = 0,
    num_groups: int | None = None,
    tiling: Tiling | None = None,
    tilings: TilingTable = DEFAULT_TILINGS,
    preferred_element_type=None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Per-group lhs^T @ rhs: out[g] = lhs[rows of g]^T @ rhs[rows of g].

    Args:
      lhs: [m, k]; rhs: [m, n]; group_sizes: [G].
      num_groups: groups computed, starting at group_offset (default all G).
      tiling: (tm, tk, tn) of this call (default: looked up in `tilings`, a `TilingTable`).
    Returns:
      [num_groups, k, n] (zero for groups without rows).
    """
    if lhs.ndim != 2 or rhs.ndim != 2 or lhs.shape[0] != rhs.shape[0]:
        raise ValueError(f"tgmm needs lhs [m, k] and rhs [m, n], got {tuple(lhs.shape)} and {tuple(rhs.shape)}")
    backend, interpret = _resolve(backend, interpret)
    G = group_sizes.shape[0]
    num = G if num_groups is None else num_groups
    m, k = lhs.shape
    n = rhs.shape[1]
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    tm, tk, tn = tuple(tiling or _check_tilings(tilings).get(backend, m, k, n, G, lhs.dtype))
    lhs_p = _pad_to(_pad_to(lhs, 0, tm), 1, tk)
    rhs_p = _pad_to(_pad_to(rhs.astype(lhs.dtype), 0, tm), 1, tn)
    goff = jnp.asarray(group_offset, jnp.int32)
    sizes = group_sizes.astype(jnp.int32)
    if backend == "tpu":
        out = gmm_tpu.tgmm_tpu(lhs_p, rhs_p, sizes, goff, num, tiling=(tm, tk, tn), out_dtype=out_dtype, interpret=interpret)
    else:
        out = gmm_gpu.tgmm_gpu(lhs_p, rhs_p, sizes, goff, num, tiling=(tm, tk, tn), out_dtype=out_dtype, interpret=interpret)
    local_sizes = jax.lax.dynamic_slice_in_dim(sizes, goff, num)
    out = jnp.where((local_sizes > 0)[:, None, None], out, 0)
    return out[:, :k, :n]


# ----------------------------------------------------------------------- quantized gmm


def _pow2_divisor(limit: int, of: int) -> int:
    """The largest power of two <= limit that divides `of`."""
    t = 1
    while t * 2 <= limit and of % (t * 2) == 0:
        t *= 2
    return t


def qgmm(
    lhs: jax.Array,
    rhs: QuantizedArray,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    group_offset: int | jax.Array = 0,
    tiling: Tiling | None = None,
    tilings: TilingTable = DEFAULT_TILINGS,
    preferred_element_type=None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """`gmm` with quantized expert weights, dequantized tile by tile inside the kernel.

    Args:
      lhs: [m, K] (or [m, N] with transpose_rhs); rows sorted by group, computed in lhs's dtype.
      rhs: a `QuantizedArray` [G_local, K, N] (groups [group_offset, group_offset + G_local)).
        Its group size must be a multiple of 16 (the smallest tile of the GPU kernels).
      transpose_rhs: out = lhs @ rhs[g]^T, [m, K] (the input gradient of the forward).
      tiling: (tm, tk, tn) of this call (default: the `tilings` entry of the float gmm of the
        same shape); the tile along K is cut to divide the quantization group size.
    Returns:
      [m, N] (or [m, K]) in preferred_element_type (default lhs's dtype), accumulated in float32.
      Differentiable in lhs; the quantized weight is frozen (no cotangent for its scales).
    """
    if not isinstance(rhs, QuantizedArray):
        raise TypeError(f"qgmm needs a QuantizedArray rhs, got {type(rhs).__name__} (float weights: gmm)")
    backend, interpret = _resolve(backend, interpret)
    if backend != "gpu":
        raise ValueError(f"qgmm has GPU kernels only, got backend={backend!r} (elsewhere dequantize: jmoe.quant.dense)")
    gs = rhs.group_size
    if gs % 16:
        raise ValueError(f"qgmm needs a quantization group size that is a multiple of 16, got group_size={gs}")
    if rhs.ndim == 3 and (lhs.ndim != 2 or lhs.shape[1] != rhs.shape[2 if transpose_rhs else 1]):
        raise ValueError(f"lhs must be [m, {rhs.shape[2 if transpose_rhs else 1]}] for a {rhs.shape} rhs "
                         f"(transpose_rhs={transpose_rhs}), got shape {tuple(lhs.shape)}")
    _check_grouped(lhs, rhs, group_sizes, transpose_rhs)  # a QuantizedArray has gmm's rhs shape
    _, K, N = rhs.shape
    m = lhs.shape[0]
    out_k, out_n = (N, K) if transpose_rhs else (K, N)
    tm, tk, tn = tuple(tiling or _check_tilings(tilings).get(backend, m, out_k, out_n, group_sizes.shape[0], lhs.dtype))
    if transpose_rhs:  # output columns are K rows: a tile of them shares one row of scales
        tn = _pow2_divisor(tn, gs)
    else:
        tk = _pow2_divisor(tk, gs)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    static = (transpose_rhs, (tm, tk, tn), tilings, out_dtype.name, backend, interpret, rhs.bits, gs, N)
    goff = jnp.asarray(group_offset, jnp.int32)
    return _qgmm(lhs, rhs.packed, rhs.scale, rhs.zero, group_sizes.astype(jnp.int32), goff, static)


def _qgmm_impl(lhs, packed, scale, zero, group_sizes, goff, static):
    transpose_rhs, tiling, _, out_dtype, backend, interpret, bits, gs, N = static
    tm, tk, tn = tiling
    K = scale.shape[1] * gs
    m = lhs.shape[0]
    cols_tile = tk if transpose_rhs else tn  # the tile along N
    n_pad = -N % cols_tile
    if n_pad:
        packed = jnp.pad(packed, ((0, 0), (0, 0), (0, n_pad * bits // 8)))
        scale = jnp.pad(scale, ((0, 0), (0, 0), (0, n_pad)))
        zero = jnp.pad(zero, ((0, 0), (0, 0), (0, n_pad)))
    lhs_p = _pad_to(_pad_to(lhs, 0, tm), 1, tk)
    n_out = K if transpose_rhs else N + n_pad
    out = qgmm_gpu.qgmm_gpu(lhs_p, packed, scale, zero, group_sizes, goff, n=n_out, tiling=tiling,
                            transpose=transpose_rhs, bits=bits, group_size=gs, out_dtype=jnp.dtype(out_dtype),
                            interpret=interpret)
    keep = _rows_in_local_groups(out.shape[0], group_sizes, goff, packed.shape[0])
    out = jnp.where(keep[:, None], out, 0)
    return out[:m, :(K if transpose_rhs else N)]


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def _qgmm(lhs, packed, scale, zero, group_sizes, goff, static):
    return _qgmm_impl(lhs, packed, scale, zero, group_sizes, goff, static)


def _qgmm_fwd(lhs, packed, scale, zero, group_sizes, goff, static):
    return _qgmm_impl(lhs, packed, scale, zero, group_sizes, goff, static), (lhs, packed, scale, zero, group_sizes, goff)


def _qgmm_bwd(static, res, g):
    transpose_rhs, _, tilings, _, backend, interpret, bits, gs, N = static
    lhs, packed, scale, zero, group_sizes, goff = res
    rhs = QuantizedArray(packed, scale, zero, bits, gs)
    dlhs = qgmm(g.astype(lhs.dtype), rhs, group_sizes, transpose_rhs=not transpose_rhs, group_offset=goff,
                tilings=tilings, preferred_element_type=lhs.dtype, backend=backend, interpret=interpret)
    return dlhs, None, jnp.zeros_like(scale), jnp.zeros_like(zero), None, None


_qgmm.defvjp(_qgmm_fwd, _qgmm_bwd)


# ------------------------------------------------------------------------- token rows


def gather_rows(x, index, *, backend=None, interpret=None):
    """x [T, d], index [N] -> [N, d] = x[index] (no custom gradient)."""
    backend, interpret = _resolve(backend, interpret)
    fn = rows.gather_rows_tpu if backend == "tpu" else rows.gather_rows_gpu
    return fn(x, index, interpret=interpret)


def combine_rows(ys, index, weights, *, backend=None, interpret=None):
    """ys [N, d], index [T, k], weights [T, k] -> [T, d] float32 (no custom gradient)."""
    backend, interpret = _resolve(backend, interpret)
    fn = rows.combine_rows_tpu if backend == "tpu" else rows.combine_rows_gpu
    return fn(ys, index, weights, interpret=interpret)


def permute_tokens(x, order, top_k, *, backend=None, interpret=None):
    """Token rows in slot order: [T, d] -> [T*k, d], row i = x[order[i] // k]."""
    return _permute(x, order.astype(jnp.int32), (top_k,) + _resolve(backend, interpret))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _permute(x, order, static):
    top_k, backend, interpret = static
    return gather_rows(x, order // top_k, backend=backend, interpret=interpret)


def _permute_fwd(x, order, static):
    return _permute(x, order, static), (order, x.shape[0])


def _permute_bwd(static, res, g):
    top_k, backend, interpret = static
    order, T = res
    inv = inverse_permutation(order).reshape(T, top_k)
    dx = combine_rows(g, inv, jnp.ones(inv.shape, jnp.float32), backend=backend, interpret=interpret)
    return dx.astype(g.dtype), None


_permute.defvjp(_permute_fwd, _permute_bwd)


def combine_tokens(ys, order, weights, *, backend=None, interpret=None):
    """Undo `permute_tokens` and sum over k: y[t] = sum_j weights[t, j] * ys[inv[t*k + j]].

    ys: [T*k, d]; order: [T*k]; weights: [T, k] -> [T, d] float32.
    """
    return _combine(ys, order.astype(jnp.int32), weights, _resolve(backend, interpret))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _combine(ys, order, weights, static):
    backend, interpret = static
    inv = inverse_permutation(order).reshape(weights.shape)
    return combine_rows(ys, inv, weights, backend=backend, interpret=interpret)


def _combine_fwd(ys, order, weights, static):
    return _combine(ys, order, weights, static), (ys, order, weights)


def _combine_bwd(static, res, dy):
    backend, interpret = static
    ys, order, weights = res
    T, k = weights.shape
    w_sorted = jnp.take(weights.reshape(-1).astype(jnp.float32), order)
    dys = gather_rows(dy.astype(jnp.float32), order // k, backend=backend, interpret=interpret) * w_sorted[:, None]
    inv = inverse_permutation(order)
    per_slot = gather_rows(ys, inv, backend=backend, interpret=interpret).reshape(T, k, -1).astype(jnp.float32)
    dw = jnp.einsum("tkd,td->tk", per_slot, dy.astype(jnp.float32))
    return dys.astype(ys.dtype), None, dw.astype(weights.dtype)


_combine.defvjp(_combine_fwd, _combine_bwd)
