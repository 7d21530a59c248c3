"""GPTQ against round to nearest: equal when the input Hessian is diagonal (no error to move),
much lower output error when the inputs are correlated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.quant import gptq_experts, gptq_quantize, hessian, quantize_rtn


def _correlated(n, a, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray((rng.standard_normal((n, 16)) @ rng.standard_normal((16, a))
                        + 0.3 * rng.standard_normal((n, a))).astype(np.float32))


def test_diagonal_hessian_gives_round_to_nearest():
    w = jax.random.normal(jax.random.key(0), (64, 32))
    h = jnp.diag(jnp.linspace(1.0, 3.0, 64))
    g, r = gptq_quantize(w, h, bits=3, group_size=32), quantize_rtn(w, 3, 32)
    np.testing.assert_array_equal(np.asarray(g.codes()), np.asarray(r.codes()))
    np.testing.assert_allclose(np.asarray(g.scale), np.asarray(r.scale), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g.zero), np.asarray(r.zero), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_output_error_falls_on_correlated_inputs(bits):
    x = _correlated(512, 64)
    w = jax.random.normal(jax.random.key(1), (64, 32))
    g, r = gptq_quantize(w, hessian(x), bits=bits, group_size=32), quantize_rtn(w, bits, 32)
    err = lambda q: float(jnp.linalg.norm(x @ q.dequantize() - x @ w))  # noqa: E731
    assert err(g) < 0.5 * err(r)


def test_experts_take_their_own_hessians():
    x0, x1 = _correlated(256, 64, 2), _correlated(256, 64, 3)
    w = jax.random.normal(jax.random.key(4), (2, 64, 32))
    both = gptq_experts(w, jnp.stack([hessian(x0), hessian(x1)]), 4, 32)
    one = gptq_quantize(w[1], hessian(x1), bits=4, group_size=32)
    np.testing.assert_array_equal(np.asarray(jax.tree.map(lambda a: a[1], both).codes()), np.asarray(one.codes()))


def test_padding_rows_weigh_nothing():
    x = _correlated(64, 32)
    padded = jnp.concatenate([x, 100 * jnp.ones((8, 32))])
    weights = jnp.concatenate([jnp.ones(64), jnp.zeros(8)])
    np.testing.assert_allclose(np.asarray(hessian(padded, weights)), np.asarray(hessian(x)), rtol=1e-5)
