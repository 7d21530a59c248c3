"""GPTQ (Frantar et al. 2022; IST-DASLab/gptq, Qwix's `contrib/gptq_core.py`): quantize a
weight one input row at a time and spread each row's rounding error over the rows not yet
quantized, weighted by the inverse Hessian of the layer's inputs.

For `w [a, b]` used as `x @ w` with calibration inputs `x [n, a]`, H = x^T x (dampened by
`damp` times its mean diagonal). With U the upper Cholesky factor of H^-1, row i is rounded
with its group's parameters (min-max of the group's rows as they stand when the group starts,
as in the reference code), and the error `(w_i - q_i) / U_ii` is subtracted from every later row j
in proportion to U_ij. Rows whose input never varies (a zero diagonal) are set to zero, as in
the reference. The result is a `QuantizedArray` in the same format as round to nearest; when
H is diagonal no error moves and GPTQ equals round to nearest.

This is one `lax.fori_loop` over the rows with a masked full-matrix update (no blocks: the
blocking of the reference code is a GPU memory optimisation), jitted, and vmapped over the
experts of a stacked weight with one Hessian per expert (the tokens each expert receives).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jmoe.quant.qarray import QuantizedArray, check_bits, check_weight, pack

DAMP = 0.01


def hessian(x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """H = x^T x over the calibration rows x [n, a] (rows weighted by `weights` [n] if given,
    e.g. 0 for padding) -> [a, a] float32."""
    if jnp.ndim(x) != 2:
        raise ValueError(f"x must be calibration rows [n, a], got shape {tuple(jnp.shape(x))}")
    if weights is not None and tuple(jnp.shape(weights)) != (x.shape[0],):
        raise ValueError(f"weights must hold one weight per row of x ({x.shape[0]}), got shape "
                         f"{tuple(jnp.shape(weights))}")
    x = x.astype(jnp.float32)
    if weights is not None:
        x = x * jnp.sqrt(weights.astype(jnp.float32))[:, None]
    return x.T @ x


@partial(jax.jit, static_argnames=("bits", "group_size", "damp"))
def gptq_quantize(w: jax.Array, h: jax.Array, bits: int, group_size: int = 64, damp: float = DAMP) -> QuantizedArray:
    """GPTQ of `w [a, b]` with input Hessian `h [a, a]` (`hessian`) -> `QuantizedArray`."""
    check_bits(bits)
    check_weight(w, group_size)
    if w.ndim != 2:
        raise ValueError(f"w must be one [a, b] weight matrix, got shape {tuple(w.shape)}")
    a, b = w.shape
    if tuple(h.shape) != (a, a):
        raise ValueError(f"h has shape {tuple(h.shape)}, expected {(a, a)}: the input Hessian of w {tuple(w.shape)}")
    qmax = (1 << bits) - 1
    W = w.astype(jnp.float32)
    h = h.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    h = jnp.where(jnp.eye(a, dtype=bool) & dead[:, None], 1.0, h)
    W = jnp.where(dead[:, None], 0.0, W)
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(a, dtype=jnp.float32)
    U = jnp.linalg.cholesky(jnp.linalg.inv(h)).T  # upper: U^T U = H^-1
    G = a // group_size
    rows = jnp.arange(a)

    def step(i, carry):
        W, codes, scale, zero = carry
        g = i // group_size

        def new_group(sz):
            block = jax.lax.dynamic_slice_in_dim(W, g * group_size, group_size, axis=0)
            lo, hi = block.min(axis=0), block.max(axis=0)
            s = jnp.where(hi > lo, (hi - lo) / qmax, 1.0)
            return sz[0].at[g].set(s), sz[1].at[g].set(-lo / s)

        scale, zero = jax.lax.cond(i % group_size == 0, new_group, lambda sz: sz, (scale, zero))
        s, z = scale[g], zero[g]
        row = W[i]
        q = jnp.clip(jnp.round(row / s + z), 0, qmax)
        err = (row - (q - z) * s) / U[i, i]
        W = W - jnp.where(rows[:, None] > i, U[i][:, None] * err[None, :], 0.0)
        return W, codes.at[i].set(q.astype(jnp.uint8)), scale, zero

    init = (W, jnp.zeros((a, b), jnp.uint8), jnp.ones((G, b), jnp.float32), jnp.zeros((G, b), jnp.float32))
    _, codes, scale, zero = jax.lax.fori_loop(0, a, step, init)
    return QuantizedArray(pack(codes, bits), scale.astype(w.dtype), zero.astype(w.dtype), bits, group_size)


def gptq_experts(w: jax.Array, h: jax.Array, bits: int, group_size: int = 64, damp: float = DAMP) -> QuantizedArray:
    """GPTQ of stacked expert weights `w [E, a, b]`, one Hessian per expert `h [E, a, a]`."""
    return jax.vmap(lambda w, h: gptq_quantize(w, h, bits, group_size, damp))(w, h)
