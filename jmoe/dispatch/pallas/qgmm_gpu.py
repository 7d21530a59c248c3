"""Grouped matmul over quantized weights for GPUs (Pallas, Triton lowering).

qgmm: out[rows of g] = lhs[rows of g] @ W[g], W a `jmoe.quant.QuantizedArray` `[G, K, N]`
read as stored (bit-packed codes, group-wise scales and zero points) and dequantized tile by
tile in the kernel, so a step reads bits/8 bytes per weight and the float weight never exists
in memory. With `transpose=True`: out = lhs @ W[g]^T (lhs [m, N] -> [m, K]), the input
gradient of the forward.

The grid and its group metadata are those of `gmm_gpu.gmm_gpu` (`gmm_gpu.pair_rows`). A weight tile spans rows
[r0, r0 + nr) of K and columns [c0, c0 + nc) of N; nr divides the quantization group size, so
the tile has one row of scales and zero points. Codes are packed 8 to `bits` bytes along N
(`jmoe.quant.qarray.pack`); a tile's bytes are read with index arrays (any bit width, power-of-
two tile shapes), joined into 32-bit words and shifted out per column.

Operands are padded by the caller: lhs to tile multiples, the packed columns, scales and zero
points to a multiple of the column tile (zero scales: padded columns are zero).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jmoe.dispatch.pallas.gmm_gpu import _whole, pair_rows
from jmoe.dispatch.pallas.metadata import group_metadata
from jmoe.dispatch.pallas.tiling import gpu_launch


def _dequantized_tile(packed_ref, scale_ref, zero_ref, g, r0, nr, c0, nc, *, bits, group_size, dtype):
    """W[g, r0:r0+nr, c0:c0+nc] as `dtype` [nr, nc]; nr divides group_size, r0 is a multiple of nr."""
    rows = jnp.broadcast_to((r0 + jnp.arange(nr))[:, None], (nr, nc))
    cols = c0 + jnp.arange(nc)
    if bits == 8:
        code = plt.load(packed_ref.at[g, rows, jnp.broadcast_to(cols[None, :], (nr, nc))]).astype(jnp.int32)
    else:
        word = jnp.zeros((nr, nc), jnp.int32)
        for j in range(bits):  # byte j of each column's 32-bit word (8 codes of `bits` bits)
            byte_col = jnp.broadcast_to(((cols // 8) * bits + j)[None, :], (nr, nc))
            word = word | (plt.load(packed_ref.at[g, rows, byte_col]).astype(jnp.int32) << (8 * j))
        code = (word >> (bits * (cols % 8))[None, :]) & ((1 << bits) - 1)
    srow = r0 // group_size
    scale = plt.load(scale_ref.at[g, srow, pl.ds(c0, nc)]).astype(jnp.float32)
    zero = plt.load(zero_ref.at[g, srow, pl.ds(c0, nc)]).astype(jnp.float32)
    return ((code.astype(jnp.float32) - zero[None, :]) * scale[None, :]).astype(dtype)


def _qgmm_kernel(offs_ref, gid_ref, mt_ref, num_ref, goff_ref, lhs_ref, packed_ref, scale_ref, zero_ref, out_ref, *,
                 tm, tk, tn, nk, transpose, bits, group_size):
    t = pl.program_id(0)
    ni = pl.program_id(1)

    @pl.when(t < num_ref[0])
    def _():
        mt, in_group, local = pair_rows(offs_ref, gid_ref, mt_ref, goff_ref, t, tm)
        tile = functools.partial(_dequantized_tile, packed_ref, scale_ref, zero_ref, local, bits=bits,
                                 group_size=group_size, dtype=lhs_ref.dtype)

        def body(ki, acc):
            a = plt.load(lhs_ref.at[pl.ds(mt * tm, tm), pl.ds(ki * tk, tk)], mask=in_group[:, None], other=0)
            if transpose:  # output columns are rows of W; the contraction runs over W's columns
                return acc + plt.dot(a, tile(ni * tn, tn, ki * tk, tk), trans_b=True)
            return acc + plt.dot(a, tile(ki * tk, tk, ni * tn, tn))

        acc = lax.fori_loop(0, nk, body, jnp.zeros((tm, tn), jnp.float32))
        plt.store(out_ref.at[pl.ds(mt * tm, tm), pl.ds(ni * tn, tn)], acc.astype(out_ref.dtype), mask=in_group[:, None])


def qgmm_gpu(lhs, packed, scale, zero, group_sizes, group_offset, *, n, tiling, transpose, bits, group_size, out_dtype,
             interpret, num_warps=None, num_stages=None):
    """lhs [m, k] (tile multiples) times the quantized [g_local, K, N] weight -> [m, n].

    Not transposed: k = K, n = N (padded); transposed: k = N (padded), n = K.
    packed [g_local, K, N_pad * bits / 8] uint8; scale, zero [g_local, K / group_size, N_pad].
    """
    m, k = lhs.shape
    tm, tk, tn = tiling
    warps, stages = gpu_launch(tm, tn, (tm * tk + tk * tn) * lhs.dtype.itemsize)
    num_warps, num_stages = num_warps or warps, num_stages or stages
    offs, gids, mts, num = group_metadata(group_sizes, m, tm, group_offset, packed.shape[0])
    goff = jnp.asarray(group_offset, jnp.int32).reshape(1)
    kernel = functools.partial(_qgmm_kernel, tm=tm, tk=tk, tn=tn, nk=k // tk, transpose=transpose, bits=bits,
                               group_size=group_size)
    args = (offs, gids, mts, num, goff, lhs, packed, scale, zero)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(gids.shape[0], n // tn),
        in_specs=[_whole(a.shape) for a in args],
        out_specs=_whole((m, n)),
        interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="jmoe_qgmm",
    )(*args)
