"""Fused row kernels of the dispatch: gather token rows into expert order, and gather
expert outputs back with the weighted sum over each token's k choices.

gather_rows(x [T, d], index [N]) -> [N, d], out[i] = x[index[i]].
combine_rows(ys [N, d], index [T, k], weights [T, k]) -> [T, d] float32,
  out[t] = sum_j weights[t, j] * ys[index[t, j]].

GPU (Triton lowering): programs own a block of rows and a slice of d and copy row by row.
TPU (Mosaic lowering): one row per grid step, its source picked by a scalar-prefetched index
map (combine steps over the k choices with the output row resident).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt


def _whole(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _pick_td(d: int) -> int:
    """The widest power-of-two column block (16..256) dividing d (d a multiple of 16)."""
    for td in (256, 128, 64, 32, 16):
        if d % td == 0:
            return td
    raise ValueError(f"row width {d} is not a multiple of 16")


def _pad_cols(a: jax.Array, multiple: int = 16) -> jax.Array:
    """a [r, d] with zero columns appended up to a multiple of `multiple` (Triton blocks are
    powers of two)."""
    extra = -a.shape[1] % multiple
    return jnp.pad(a, ((0, 0), (0, extra))) if extra else a


# ----------------------------------------------------------------------------------- GPU


def _gather_kernel_gpu(idx_ref, x_ref, o_ref, *, tr, td, n):
    i = pl.program_id(0)
    j = pl.program_id(1)

    def body(r, carry):
        row = i * tr + r

        @pl.when(row < n)
        def _():
            v = plt.load(x_ref.at[idx_ref[row], pl.ds(j * td, td)])
            plt.store(o_ref.at[row, pl.ds(j * td, td)], v)

        return carry

    lax.fori_loop(0, tr, body, 0)


def _combine_kernel_gpu(idx_ref, w_ref, ys_ref, o_ref, *, tr, td, k, t_rows):
    i = pl.program_id(0)
    j = pl.program_id(1)

    def body(r, carry):
        t = i * tr + r

        @pl.when(t < t_rows)
        def _():
            acc = jnp.zeros((td,), jnp.float32)
            for c in range(k):
                src = idx_ref[t * k + c]
                acc += w_ref[t * k + c] * plt.load(ys_ref.at[src, pl.ds(j * td, td)]).astype(jnp.float32)
            plt.store(o_ref.at[t, pl.ds(j * td, td)], acc)

        return carry

    lax.fori_loop(0, tr, body, 0)


def gather_rows_gpu(x, index, *, interpret, rows_per_program=32):
    """Triton `gather_rows`: x [T, d], index [N] -> [N, d] = x[index], in x's dtype;
    `rows_per_program` rows per program."""
    n = index.shape[0]
    width = x.shape[1]
    x = _pad_cols(x)
    d = x.shape[1]
    td = _pick_td(d)
    kernel = functools.partial(_gather_kernel_gpu, tr=rows_per_program, td=td, n=n)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, d), x.dtype),
        grid=(pl.cdiv(n, rows_per_program), d // td),
        in_specs=[_whole(index.shape), _whole(x.shape)],
        out_specs=_whole((n, d)),
        interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        name="jmoe_gather_rows",
    )(index.astype(jnp.int32), x)
    return out[:, :width] if d != width else out


def combine_rows_gpu(ys, index, weights, *, interpret, rows_per_program=16):
    """Triton `combine_rows`: ys [N, d], index [T, k], weights [T, k] -> [T, d] float32,
    out[t] = sum_j weights[t, j] * ys[index[t, j]]; `rows_per_program` tokens per program."""
    t_rows, k = index.shape
    width = ys.shape[1]
    ys = _pad_cols(ys)
    d = ys.shape[1]
    td = _pick_td(d)
    idx = index.reshape(-1).astype(jnp.int32)
    w = weights.reshape(-1).astype(jnp.float32)
    kernel = functools.partial(_combine_kernel_gpu, tr=rows_per_program, td=td, k=k, t_rows=t_rows)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((t_rows, d), jnp.float32),
        grid=(pl.cdiv(t_rows, rows_per_program), d // td),
        in_specs=[_whole(idx.shape), _whole(w.shape), _whole(ys.shape)],
        out_specs=_whole((t_rows, d)),
        interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        name="jmoe_combine_rows",
    )(idx, w, ys)
    return out[:, :width] if d != width else out


# ----------------------------------------------------------------------------------- TPU


def _gather_kernel_tpu(idx_ref, x_ref, o_ref):
    o_ref[...] = x_ref[...]


def _combine_kernel_tpu(idx_ref, w_ref, ys_ref, o_ref, *, k):
    t = pl.program_id(0)
    c = pl.program_id(1)

    @pl.when(c == 0)
    def _():
        o_ref[...] = jnp.zeros_like(o_ref)

    o_ref[...] += w_ref[t * k + c] * ys_ref[...].astype(jnp.float32)


def gather_rows_tpu(x, index, *, interpret):
    """Mosaic `gather_rows`: x [T, d], index [N] -> [N, d] = x[index], in x's dtype; one row per
    grid step."""
    n = index.shape[0]
    t_rows, d = x.shape
    out = pl.pallas_call(
        _gather_kernel_tpu,
        out_shape=jax.ShapeDtypeStruct((n, 1, d), x.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(n,),
            in_specs=[pl.BlockSpec((None, 1, d), lambda i, idx: (idx[i], 0, 0))],
            out_specs=pl.BlockSpec((None, 1, d), lambda i, idx: (i, 0, 0)),
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name="jmoe_gather_rows",
    )(index.astype(jnp.int32), x.reshape(t_rows, 1, d))
    return out.reshape(n, d)


def combine_rows_tpu(ys, index, weights, *, interpret):
    """Mosaic `combine_rows`: ys [N, d], index [T, k], weights [T, k] -> [T, d] float32,
    out[t] = sum_j weights[t, j] * ys[index[t, j]]; one grid step per (token, choice)."""
    t_rows, k = index.shape
    n, d = ys.shape
    kernel = functools.partial(_combine_kernel_tpu, k=k)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((t_rows, 1, d), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(t_rows, k),
            in_specs=[pl.BlockSpec((None, 1, d), lambda t, c, idx, w: (idx[t * k + c], 0, 0))],
            out_specs=pl.BlockSpec((None, 1, d), lambda t, c, idx, w: (t, 0, 0)),
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="jmoe_combine_rows",
    )(index.reshape(-1).astype(jnp.int32), weights.reshape(-1).astype(jnp.float32), ys.reshape(n, 1, d))
    return out.reshape(t_rows, d)
