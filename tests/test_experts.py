import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig
from jmoe.experts import all_experts, ffn, init_experts


def np_gelu(x):
    from math import erf, sqrt
    return x * 0.5 * (1 + np.vectorize(erf)(x / sqrt(2)))


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu"])
def test_ffn_matches_numpy(activation):
    cfg = MoEConfig(num_experts=3, top_k=1, d_model=4, d_ff=6, activation=activation)
    params = init_experts(jax.random.key(0), cfg)
    assert params["w_up"].shape == (3, 4, 6) and params["w_down"].shape == (3, 6, 4)
    assert ("w_gate" in params) == (activation != "gelu")
    x = np.asarray(jax.random.normal(jax.random.key(1), (5, 4)))
    p = jax.tree.map(lambda a: np.asarray(a[1]), params)
    up = x @ p["w_up"]
    if activation == "swiglu":
        g = x @ p["w_gate"]
        h = g / (1 + np.exp(-g)) * up
    elif activation == "geglu":
        h = np_gelu(x @ p["w_gate"]) * up
    else:
        h = np_gelu(up)
    np.testing.assert_allclose(ffn(jax.tree.map(lambda a: a[1], params), jnp.asarray(x), activation), h @ p["w_down"], rtol=1e-5, atol=1e-6)
    ys = all_experts(params, jnp.asarray(x), activation)
    assert ys.shape == (5, 3, 4)
    np.testing.assert_allclose(ys[:, 1], h @ p["w_down"], rtol=1e-5, atol=1e-6)


def test_param_dtype_and_compute_dtype():
    cfg = MoEConfig(num_experts=2, top_k=1, d_model=4, d_ff=6, param_dtype="bfloat16")
    params = init_experts(jax.random.key(0), cfg)
    assert params["w_up"].dtype == jnp.bfloat16
    y = ffn(jax.tree.map(lambda a: a[0], params), jnp.ones((2, 4)), "swiglu", dtype="float32")
    assert y.dtype == jnp.float32


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_ffn_with_a_grouped_matmul_is_ffn_per_expert(activation):
    cfg = MoEConfig(num_experts=3, top_k=1, d_model=4, d_ff=6, activation=activation)
    params = init_experts(jax.random.key(0), cfg)
    sizes = jnp.array([4, 0, 3], jnp.int32)
    xs = jax.random.normal(jax.random.key(1), (7, 4))
    calls = []

    def matmul(a, w):
        calls.append(w.shape)
        return jax.lax.ragged_dot(a, w, sizes)

    y = ffn(params, xs, activation, matmul=matmul)
    assert len(calls) == (3 if activation == "swiglu" else 2) and all(len(s) == 3 for s in calls)
    one = lambda e: jax.tree.map(lambda a: a[e], params)
    expected = jnp.concatenate([ffn(one(0), xs[:4], activation), ffn(one(2), xs[4:], activation)])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
