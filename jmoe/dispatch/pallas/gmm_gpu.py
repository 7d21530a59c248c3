"""Grouped matmul kernels for GPUs (Pallas, Triton lowering).

gmm: out[rows of g] = lhs[rows of g] @ rhs[g]. Grid (max (group, m-tile) pairs, n tiles);
each program loads its pair from the group metadata, accumulates over k in float32 and
stores only its group's rows (masked stores, so a tile shared by two groups is written by
two programs, each its own rows). Programs past the real pairs exit at once.

tgmm: out[g] = lhs[rows of g]^T @ rhs[rows of g] (the weight gradient). Grid (groups,
k tiles, n tiles); each program walks its group's row tiles with masked loads.

Operands are padded by the caller so that m, k, n are multiples of the tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jmoe.dispatch.pallas.metadata import group_metadata
from jmoe.dispatch.pallas.tiling import gpu_launch


def _whole(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def pair_rows(offs_ref, gid_ref, mt_ref, goff_ref, t, tm):
    """Grid step t's (group, m-tile) pair: (row tile, [tm] mask of the group's rows in it, index
    of the group in the local rhs)."""
    g = gid_ref[t]
    mt = mt_ref[t]
    rows = mt * tm + jnp.arange(tm)
    return mt, (rows >= offs_ref[g]) & (rows < offs_ref[g + 1]), g - goff_ref[0]


def _gmm_kernel(offs_ref, gid_ref, mt_ref, num_ref, goff_ref, lhs_ref, rhs_ref, out_ref, *, tm, tk, tn, nk, transpose_rhs):
    t = pl.program_id(0)
    ni = pl.program_id(1)

    @pl.when(t < num_ref[0])
    def _():
        mt, in_group, local = pair_rows(offs_ref, gid_ref, mt_ref, goff_ref, t, tm)

        def body(ki, acc):
            a = plt.load(lhs_ref.at[pl.ds(mt * tm, tm), pl.ds(ki * tk, tk)], mask=in_group[:, None], other=0)
            if transpose_rhs:
                b = plt.load(rhs_ref.at[local, pl.ds(ni * tn, tn), pl.ds(ki * tk, tk)])
                return acc + plt.dot(a, b, trans_b=True)
            b = plt.load(rhs_ref.at[local, pl.ds(ki * tk, tk), pl.ds(ni * tn, tn)])
            return acc + plt.dot(a, b)

        acc = lax.fori_loop(0, nk, body, jnp.zeros((tm, tn), jnp.float32))
        plt.store(out_ref.at[pl.ds(mt * tm, tm), pl.ds(ni * tn, tn)], acc.astype(out_ref.dtype), mask=in_group[:, None])


def gmm_gpu(lhs, rhs, group_sizes, group_offset, *, tiling, transpose_rhs, out_dtype, interpret, num_warps=None,
            num_stages=None):
    """lhs [m, k], rhs [g_local, k, n] ([g_local, n, k] transposed) -> [m, n]; m, k, n tile multiples.
    num_warps, num_stages: default `gpu_launch`."""
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling
    warps, stages = gpu_launch(tm, tn, (tm * tk + tk * tn) * lhs.dtype.itemsize)
    num_warps, num_stages = num_warps or warps, num_stages or stages
    offs, gids, mts, num = group_metadata(group_sizes, m, tm, group_offset, rhs.shape[0])
    goff = jnp.asarray(group_offset, jnp.int32).reshape(1)
    kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, tn=tn, nk=k // tk, transpose_rhs=transpose_rhs)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(gids.shape[0], n // tn),
        in_specs=[_whole(a.shape) for a in (offs, gids, mts, num, goff, lhs, rhs)],
        out_specs=_whole((m, n)),
        interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="jmoe_gmm",
    )(offs, gids, mts, num, goff, lhs, rhs)


def _tgmm_kernel(offs_ref, goff_ref, lhs_ref, rhs_ref, out_ref, *, tm, tk, tn):
    gl = pl.program_id(0)
    ki = pl.program_id(1)
    ni = pl.program_id(2)
    g = gl + goff_ref[0]
    start = offs_ref[g]
    end = offs_ref[g + 1]

    def body(mt, acc):
        rows = mt * tm + jnp.arange(tm)
        in_group = (rows >= start) & (rows < end)
        a = plt.load(lhs_ref.at[pl.ds(mt * tm, tm), pl.ds(ki * tk, tk)], mask=in_group[:, None], other=0)
        b = plt.load(rhs_ref.at[pl.ds(mt * tm, tm), pl.ds(ni * tn, tn)], mask=in_group[:, None], other=0)
        return acc + plt.dot(a, b, trans_a=True)

    first = start // tm
    last = jnp.where(end > start, (end + tm - 1) // tm, first)
    acc = lax.fori_loop(first, last, body, jnp.zeros((tk, tn), jnp.float32))
    plt.store(out_ref.at[gl, pl.ds(ki * tk, tk), pl.ds(ni * tn, tn)], acc.astype(out_ref.dtype))


def tgmm_gpu(lhs, rhs, group_sizes, group_offset, num_local_groups, *, tiling, out_dtype, interpret, num_warps=None,
             num_stages=None):
    """lhs [m, k], rhs [m, n] -> [num_local_groups, k, n]; m, k, n tile multiples.
    num_warps, num_stages: default `gpu_launch` of the output tile."""
    m, k = lhs.shape
    n = rhs.shape[1]
    tm, tk, tn = tiling
    warps, stages = gpu_launch(tk, tn, (tm * tk + tm * tn) * lhs.dtype.itemsize)
    num_warps, num_stages = num_warps or warps, num_stages or stages
    sizes = group_sizes.astype(jnp.int32)
    offs = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(sizes)])
    goff = jnp.asarray(group_offset, jnp.int32).reshape(1)
    kernel = functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_local_groups, k, n), out_dtype),
        grid=(num_local_groups, k // tk, n // tn),
        in_specs=[_whole(a.shape) for a in (offs, goff, lhs, rhs)],
        out_specs=_whole((num_local_groups, k, n)),
        interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="jmoe_tgmm",
    )(offs, goff, lhs, rhs)
