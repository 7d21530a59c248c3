"""Online expert skipping (MC-MoE's dynamic pruning): the rule against a numpy reference, the
layer on every dispatch against the all-experts reference with the skipped routing, and the
reported skip rate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe.experts import all_experts
from jmoe.routing.skip import skip_low_weight


def reference_skip(ids, w, mask, ratio, E):
    """Per token: drop FFN slots below ratio * the top weight, rescale the rest to the old sum."""
    ids, w, mask = np.asarray(ids), np.asarray(w, np.float64), np.asarray(mask)
    mask_out, w_out = mask.copy(), w.copy()
    for t in range(ids.shape[0]):
        ffn = mask[t] & (ids[t] < E)
        if not ffn.any():
            continue
        top = w[t][ffn].max()
        drop = ffn & (w[t] < ratio * top)
        kept = ffn & ~drop
        mask_out[t] = mask[t] & ~drop
        w_out[t][drop] = 0.0
        w_out[t][kept] = w[t][kept] * w[t][ffn].sum() / w[t][kept].sum()
    return mask_out, w_out


def test_the_rule_matches_the_reference_and_never_drops_the_top_slot():
    cfg = jmoe.MoEConfig(num_experts=8, top_k=4, d_model=8, d_ff=16)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (64, 8)) * 2
    routing = jmoe.ROUTERS.get("topk").apply(params["router"], x, cfg, state=None, key=None, carry=None)
    for ratio in (0.0, 0.3, 0.7, 1.0):
        out, n = skip_low_weight(routing, ratio, cfg.num_ffn_choices)
        mask, w = reference_skip(routing.expert_ids, routing.weights, routing.mask, ratio, cfg.num_experts)
        np.testing.assert_array_equal(np.asarray(out.mask), mask)
        np.testing.assert_allclose(np.asarray(out.weights), w, rtol=1e-5, atol=1e-7)
        assert int(n) == int((np.asarray(routing.mask) & ~mask).sum())
        top = np.argmax(np.asarray(routing.weights), axis=1)
        assert np.asarray(out.mask)[np.arange(64), top].all()
        np.testing.assert_allclose(np.asarray(out.weights).sum(1), np.asarray(routing.weights).sum(1), rtol=1e-5)
    assert skip_low_weight(routing, 0.0, 8)[0] is routing
    assert 0 < int(skip_low_weight(routing, 0.5, 8)[1]) < 64 * 3


def test_flop_free_slots_are_left_alone():
    cfg = jmoe.MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=16, router="null_experts",
                         router_options=dict(num_null_experts=4))
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (64, 8)) * 3
    routing = jmoe.ROUTERS.get(cfg.router).apply(params["router"], x, cfg, state=None, key=None, carry=None)
    out, _ = skip_low_weight(routing, 0.9, cfg.num_ffn_choices)
    null = np.asarray(routing.mask) & (np.asarray(routing.expert_ids) >= 4)
    assert null.any()
    np.testing.assert_array_equal(np.asarray(out.mask)[null], True)
    np.testing.assert_array_equal(np.asarray(out.weights)[null], np.asarray(routing.weights)[null])


@pytest.mark.parametrize("dispatch", ["dropless", "dense", "gather"])
def test_layer_with_skipping_equals_the_reference_forward_and_gradient(dispatch):
    cfg = jmoe.MoEConfig(num_experts=8, top_k=3, d_model=16, d_ff=32, dispatch=dispatch, skip_ratio=0.5)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (40, 16)) * 2

    def reference(params, x):
        routing = jmoe.ROUTERS.get("topk").apply(params["router"], x, cfg, state=None, key=None, carry=None)
        routing, _ = skip_low_weight(routing, 0.5, 8)
        return jnp.einsum("te,ted->td", routing.combine_weights(8), all_experts(params["experts"], x, cfg.activation))

    def layer(params, x):
        return jmoe.moe_layer(params, x, cfg)[0]

    np.testing.assert_allclose(np.asarray(layer(params, x)), np.asarray(reference(params, x)), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))  # noqa: E731
    g_layer = jax.jit(jax.grad(loss(layer), argnums=(0, 1)))(params, x)
    g_ref = jax.jit(jax.grad(loss(reference), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(g_layer), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_skip_rate_is_reported():
    cfg = jmoe.MoEConfig(num_experts=8, top_k=2, d_model=16, d_ff=32)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (128, 16)) * 2
    _, aux0 = jmoe.moe_layer(params, x, cfg)
    _, aux = jmoe.moe_layer(params, x, cfg.replace(skip_ratio=0.6))
    assert float(aux0.skipped_fraction) == 0.0
    routing = aux0.routing
    _, n = skip_low_weight(routing, 0.6, 8)
    np.testing.assert_allclose(float(aux.skipped_fraction), float(n) / (128 * 2), rtol=1e-6)
    np.testing.assert_allclose(float(aux.experts_per_token), 2 * (1 - float(aux.skipped_fraction)), rtol=1e-6)


def test_skip_ratio_is_checked():
    with pytest.raises(ValueError, match="skip_ratio"):
        jmoe.MoEConfig(skip_ratio=1.5)
