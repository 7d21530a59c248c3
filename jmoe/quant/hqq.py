"""HQQ (Half-Quadratic Quantization, mobiusml/hqq): calibration-free refinement of the zero
points of round-to-nearest group quantization.

With the scale fixed, the zero point z of a group minimises the lp error (p < 1, robust to the
few large weights that min-max ranges are set by) between the weights and their quantized
values. HQQ splits the error off as W_e and alternates, as in `hqq/core/optimize.py`:

    Q   = clip(round(W / s + z), 0, 2^b - 1)
    W_e = shrink_p(W - (Q - z) s, beta)        sign(x) relu(|x| - |x|^(p-1) / beta)
    z   = mean over the group of (Q - (W - W_e) / s)
    beta <- kappa beta

with HQQ's defaults p = 0.7, beta = 10, kappa = 1.01 and 20 iterations. Each group keeps the
zero point with the lowest mean absolute error seen (the "v2" optimiser's best-keeping, here
per group rather than per tensor), so the result is never worse than round-to-nearest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.quant.qarray import QuantizedArray, check_bits, check_weight, from_params, group_view, minmax_params

P, BETA, KAPPA, ITERS = 0.7, 10.0, 1.01, 20


def _shrink(x, beta, p):
    ax = jnp.abs(x)
    return jnp.sign(x) * jax.nn.relu(ax - jnp.power(jnp.maximum(ax, 1e-12), p - 1) / beta)


def refine_zero(w: jax.Array, scale: jax.Array, zero: jax.Array, bits: int, group_size: int, *, p: float = P,
                beta: float = BETA, kappa: float = KAPPA, iters: int = ITERS) -> jax.Array:
    """Zero points `[..., a/g, b]` refined by HQQ's half-quadratic iteration (scale fixed)."""
    wg = group_view(w.astype(jnp.float32), group_size)  # [..., G, g, b]
    s = scale.astype(jnp.float32)[..., None, :]
    qmax = (1 << bits) - 1

    def quant(z):
        q = jnp.clip(jnp.round(wg / s + z[..., None, :]), 0, qmax)
        return q, jnp.mean(jnp.abs(wg - (q - z[..., None, :]) * s), axis=-2)

    def step(i, carry):
        z, best_z, best_err, b = carry
        q, err = quant(z)
        better = err < best_err
        best_z, best_err = jnp.where(better, z, best_z), jnp.where(better, err, best_err)
        w_e = _shrink(wg - (q - z[..., None, :]) * s, b, p)
        z = jnp.mean(q - (wg - w_e) / s, axis=-2)
        return z, best_z, best_err, b * kappa

    z0 = zero.astype(jnp.float32)
    init = (z0, z0, jnp.full(z0.shape, jnp.inf, jnp.float32), jnp.float32(beta))
    z, best_z, best_err, _ = jax.lax.fori_loop(0, iters, step, init)
    _, err = quant(z)  # the last update is a candidate too
    return jnp.where(err < best_err, z, best_z)


def quantize_hqq(w: jax.Array, bits: int, group_size: int = 64, **options) -> QuantizedArray:
    """Group quantization of `w [..., a, b]` with min-max scales and HQQ-refined zero points."""
    check_bits(bits)
    check_weight(w, group_size)
    scale, zero = minmax_params(w, bits, group_size)
    zero = refine_zero(w, scale, zero, bits, group_size, **options)
    return from_params(w, scale, zero, bits, group_size)
