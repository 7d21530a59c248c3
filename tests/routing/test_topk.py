import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig
from jmoe.routing import get_router
from jmoe.routing.topk import topk_route

CFG = MoEConfig(num_experts=4, top_k=2, d_model=3, d_ff=8)


def test_hand_worked_example():
    # Identity-like router: logits are the first 3 coords plus a zero column.
    w = jnp.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    x = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    r = topk_route({"w": w}, x, CFG)
    e = np.exp
    p0 = np.array([e(2), e(1), e(0), e(0)]) / (e(2) + e(1) + 2)
    np.testing.assert_array_equal(r.expert_ids, [[0, 1], [2, 0]])  # tie at 0 -> lower index
    np.testing.assert_allclose(r.weights[0], p0[:2], rtol=1e-6)
    np.testing.assert_allclose(r.probs[0], p0, rtol=1e-6)
    assert r.mask.all()
    rn = topk_route({"w": w}, x, CFG.replace(router_options=dict(renormalize=True)))
    np.testing.assert_allclose(rn.weights[0], p0[:2] / p0[:2].sum(), rtol=1e-6)


def test_softmax_after_topk_equals_renormalized_softmax():
    key = jax.random.key(0)
    params = get_router("topk").init(key, MoEConfig(num_experts=8, top_k=3, d_model=16, d_ff=8))
    x = jax.random.normal(jax.random.key(1), (32, 16)) * 5
    c = MoEConfig(num_experts=8, top_k=3, d_model=16, d_ff=8)
    a = topk_route(params, x, c.replace(router_options=dict(softmax_after_topk=True)))
    b = topk_route(params, x, c.replace(router_options=dict(renormalize=True)))
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.weights.sum(-1), 1.0, rtol=1e-5)


def test_shapes_dtypes_and_float32_router_for_bf16_input():
    c = MoEConfig(num_experts=8, top_k=2, d_model=16, d_ff=8)
    params = get_router("topk").init(jax.random.key(0), c)
    x = jax.random.normal(jax.random.key(1), (10, 16)).astype(jnp.bfloat16)
    r = jax.jit(lambda p, x: topk_route(p, x, c))(params, x)
    assert r.expert_ids.shape == (10, 2) and r.expert_ids.dtype == jnp.int32
    assert r.weights.shape == (10, 2) and r.probs.shape == (10, 8) and r.logits.shape == (10, 8)
    assert r.logits.dtype == jnp.float32 and r.probs.dtype == jnp.float32
    # selected experts are distinct and carry the largest probabilities
    ids = np.asarray(r.expert_ids)
    assert all(len(set(row)) == 2 for row in ids)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(r.probs), ids, 1), r.weights, rtol=1e-6)
    assert (np.sort(np.asarray(r.probs), -1)[:, -2:].min(-1) <= np.asarray(r.weights).min(-1) + 1e-7).all()


def test_jitter_only_with_key():
    c = MoEConfig(num_experts=8, top_k=2, d_model=16, d_ff=8, router_jitter=0.1)
    params = get_router("topk").init(jax.random.key(0), c)
    x = jax.random.normal(jax.random.key(1), (10, 16))
    plain = topk_route(params, x, c.replace(router_jitter=0.0))
    no_key = topk_route(params, x, c)
    np.testing.assert_array_equal(plain.logits, no_key.logits)
    jittered = topk_route(params, x, c, key=jax.random.key(2))
    assert not np.allclose(jittered.logits, plain.logits)
    again = topk_route(params, x, c, key=jax.random.key(2))
    np.testing.assert_array_equal(jittered.logits, again.logits)
    # within the multiplicative band: |x*u - x| <= eps |x|
    np.testing.assert_allclose(jittered.logits, plain.logits, atol=0.1 * float(jnp.abs(x).max() * jnp.abs(params["w"]).sum(0).max()))


def test_gradient_flows_through_weights():
    c = MoEConfig(num_experts=4, top_k=2, d_model=5, d_ff=8)
    params = get_router("topk").init(jax.random.key(0), c)
    x = jax.random.normal(jax.random.key(1), (6, 5))
    g = jax.grad(lambda p: jnp.sum(topk_route(p, x, c).weights ** 2))(params)
    assert np.abs(g["w"]).sum() > 0


def test_unknown_router():
    with pytest.raises(ValueError, match="unknown router 'sinkhorn'"):
        get_router("sinkhorn")
