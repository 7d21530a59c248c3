import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe import MoEConfig
from jmoe.losses import update_selection_bias
from jmoe.routing.sigmoid_bias import group_limited_scores, sigmoid_bias_route

CFG = MoEConfig(router="sigmoid_bias", num_experts=8, top_k=2, d_model=8, d_ff=8,
                router_options=dict(expert_groups=4, topk_groups=2, route_scale=2.5))


def identity_router(E, d):
    return {"w": jnp.eye(d, E) * 1.0}


def test_hand_worked_example():
    cfg = MoEConfig(router="sigmoid_bias", num_experts=4, top_k=2, d_model=4, d_ff=4,
                    router_options=dict(expert_groups=2, topk_groups=1, route_scale=2.0))
    x = jnp.array([[0.5, 2.0, 1.0, 1.5]])  # logits = x; groups {0,1} and {2,3}
    s = 1 / (1 + np.exp(-np.array([0.5, 2.0, 1.0, 1.5])))
    r = sigmoid_bias_route({"w": jnp.eye(4)}, x, cfg, state={"bias": jnp.zeros(4)})
    # group {0,1} scores s0+s1 = 0.62+0.88 = 1.50 < s2+s3 = 0.73+0.82 = 1.55: group {2,3} wins
    assert sorted(np.asarray(r.expert_ids[0]).tolist()) == [2, 3]
    np.testing.assert_allclose(r.weights[0].sum(), 2.0, rtol=1e-6)
    np.testing.assert_allclose(r.weights[0], 2.0 * s[[3, 2]] / s[[2, 3]].sum(), rtol=1e-6)
    # a bias on expert 0 moves the selection to group {0,1}; weights still come from s
    r2 = sigmoid_bias_route({"w": jnp.eye(4)}, x, cfg, state={"bias": jnp.array([0.5, 0, 0, 0])})
    assert sorted(np.asarray(r2.expert_ids[0]).tolist()) == [0, 1]
    np.testing.assert_allclose(r2.weights[0], 2.0 * s[[0, 1]][::-1] / s[[0, 1]].sum() if r2.expert_ids[0, 0] == 1
                               else 2.0 * s[[0, 1]] / s[[0, 1]].sum(), rtol=1e-6)


def test_weights_do_not_depend_on_bias():
    params = jmoe.init_moe(jax.random.key(0), CFG)["router"]
    x = jax.random.normal(jax.random.key(1), (64, 8))
    r0 = sigmoid_bias_route(params, x, CFG, state={"bias": jnp.zeros(8)})
    bias = jax.random.normal(jax.random.key(2), (8,)) * 0.3
    r1 = sigmoid_bias_route(params, x, CFG, state={"bias": bias})
    s = np.asarray(r1.probs)
    expected = np.take_along_axis(s, np.asarray(r1.expert_ids), 1)
    expected = expected / expected.sum(-1, keepdims=True) * CFG.router_options.route_scale
    np.testing.assert_allclose(r1.weights, expected, rtol=1e-5)
    np.testing.assert_array_equal(r0.probs, r1.probs)
    assert not np.array_equal(r0.expert_ids, r1.expert_ids)  # the bias did change choices


def test_group_limiting_never_picks_outside_the_chosen_groups():
    params = jmoe.init_moe(jax.random.key(0), CFG)["router"]
    x = jax.random.normal(jax.random.key(1), (200, 8)) * 3
    bias = jax.random.normal(jax.random.key(2), (8,)) * 0.2
    r = sigmoid_bias_route(params, x, CFG, state={"bias": bias})
    biased = np.asarray(r.probs) + np.asarray(bias)
    g = biased.reshape(200, 4, 2)
    group_score = np.sort(g, -1)[:, :, -2:].sum(-1)
    allowed = np.argsort(-group_score, -1, kind="stable")[:, :2]
    for t in range(200):
        for e in np.asarray(r.expert_ids[t]):
            assert e // 2 in allowed[t]
    masked = group_limited_scores(jnp.asarray(biased), 4, 2)
    assert int(jnp.sum(jnp.isfinite(masked[0]))) == 4


def test_bias_update_and_layer_state():
    counts = jnp.array([10.0, 2.0, 5.0, 3.0])
    b = update_selection_bias(jnp.zeros(4), counts, 0.01)
    np.testing.assert_allclose(b, [-0.01, 0.01, 0.0, 0.01])  # load 5 equals the mean: no change
    cfg = CFG
    params = jmoe.init_moe(jax.random.key(0), cfg)
    state = jmoe.init_moe_state(cfg)
    x = jax.random.normal(jax.random.key(1), (32, 8))
    y, aux = jax.jit(lambda p, x, s: jmoe.moe_layer(p, x, cfg, state=s))(params, x, state)
    new = jmoe.layer.update_moe_state(state, aux, cfg)
    load = np.asarray(aux.tokens_per_expert)
    np.testing.assert_allclose(new["bias"], -cfg.router_options.bias_update_rate * np.sign(load - load.mean()))
    g = jax.grad(lambda p: jnp.sum(jmoe.moe_layer(p, x, cfg, state=state)[0]))(params)
    assert float(jnp.abs(g["router"]["w"]).sum()) > 0


def test_validation():
    with pytest.raises(ValueError, match="expert_groups"):
        MoEConfig(router="sigmoid_bias", num_experts=8, router_options=dict(expert_groups=3))
    with pytest.raises(ValueError, match="topk_groups"):
        MoEConfig(router="sigmoid_bias", num_experts=8, router_options=dict(expert_groups=4, topk_groups=5))
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(router="sigmoid_bias", num_experts=8, top_k=3, router_options=dict(expert_groups=4, topk_groups=1))
