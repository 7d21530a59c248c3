"""expert_choice, top_p and null_experts: invariants and hand-worked examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe import MoEConfig
from jmoe.dispatch import get_dispatch
from jmoe.nn import LMConfig
from jmoe.routing.expert_choice import expert_choice_capacity, expert_choice_route
from jmoe.routing.null_experts import null_experts_route
from jmoe.routing.top_p import top_p_route


def test_expert_choice_loads_are_all_equal():
    cfg = MoEConfig(router="expert_choice", num_experts=8, top_k=2, d_model=16, d_ff=8, allow_noncausal=True)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (40, 16))
    r = expert_choice_route(params["router"], x, cfg)
    C = expert_choice_capacity(40, 2, 8)
    assert C == 10
    np.testing.assert_array_equal(np.asarray(r.mask).sum(0), C)
    # each expert holds its C most probable tokens
    p = np.asarray(r.probs)
    for e in range(8):
        chosen = np.flatnonzero(np.asarray(r.mask[:, e]))
        assert p[chosen, e].min() >= np.sort(p[:, e])[-C] - 1e-7
    np.testing.assert_allclose(r.weights, np.where(r.mask, p, 0))
    y, aux = jmoe.moe_layer(params, x, cfg)
    ref, _ = get_dispatch("dense")(params["experts"], x, r, cfg)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux.experts_per_token, 2.0)


def test_expert_choice_is_refused_in_a_causal_decoder():
    moe = MoEConfig(router="expert_choice", num_experts=4, top_k=1, d_model=16, d_ff=8)
    with pytest.raises(ValueError, match="not causal"):
        LMConfig(d_model=16, n_heads=2, moe=moe)
    LMConfig(d_model=16, n_heads=2, moe=moe.replace(allow_noncausal=True))


def test_top_p_hand_example_and_invariants():
    cfg = MoEConfig(router="top_p", num_experts=4, top_k=4, d_model=4, d_ff=4, router_options=dict(threshold=0.5))
    logits = np.log(np.array([[0.1, 0.45, 0.3, 0.15], [0.7, 0.1, 0.1, 0.1]]))
    r = top_p_route({"w": jnp.eye(4)}, jnp.asarray(logits), cfg)
    # token 0: sorted 0.45, 0.30 (0.45 <= 0.5 before it), then 0.15 has 0.75 before it: stop
    np.testing.assert_array_equal(r.mask, [[True, True, False, False], [True, False, False, False]])
    np.testing.assert_allclose(r.weights[0, :2], [0.45, 0.30], rtol=1e-5)  # not renormalised
    cfg2 = MoEConfig(router="top_p", num_experts=8, top_k=8, d_model=16, d_ff=8, router_options=dict(threshold=0.6))
    params = jmoe.init_moe(jax.random.key(0), cfg2)["router"]
    x = jax.random.normal(jax.random.key(1), (100, 16)) * 4
    r = top_p_route(params, x, cfg2)
    kept = np.asarray(r.mask)
    assert kept[:, 0].all() and (np.asarray(r.weights).sum(-1) >= 0.6 - 1e-6).all()
    assert len(set(kept.sum(-1))) > 1  # the number of experts varies per token
    # the bound: top_k=2 never keeps more than 2
    r2 = top_p_route(params, x, cfg2.replace(top_k=2))
    assert np.asarray(r2.mask).sum(-1).max() <= 2


def test_top_p_entropy_loss_enters_the_aux_loss():
    cfg = MoEConfig(router="top_p", num_experts=8, top_k=8, d_model=16, d_ff=8, router_options=dict(threshold=0.4), entropy_loss_coef=0.5)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (30, 16))
    _, aux = jmoe.moe_layer(params, x, cfg)
    np.testing.assert_allclose(
        aux.loss, cfg.aux_loss_coef * aux.balance_loss + cfg.z_loss_coef * aux.z_loss + 0.5 * aux.router_entropy, rtol=1e-6
    )
    assert 1 <= float(aux.experts_per_token) <= 8


def test_null_experts_contribute_nothing_and_renormalise_true_experts():
    cfg = MoEConfig(router="null_experts", num_experts=4, router_options=dict(num_null_experts=4), top_k=2, d_model=16, d_ff=8)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    assert params["router"]["w"].shape == (16, 8)
    x = jax.random.normal(jax.random.key(1), (64, 16)) * 3
    r = null_experts_route(params["router"], x, cfg)
    ids, w = np.asarray(r.expert_ids), np.asarray(r.weights)
    true = ids < 4
    assert (w[~true] == 0).all()
    some = true.any(-1)
    np.testing.assert_allclose(w[some].sum(-1), 1.0, rtol=1e-6)
    assert (~true).any()  # at this init some slots go to null experts
    y, aux = jmoe.moe_layer(params, x, cfg)
    ffn_only = r.for_ffn_experts(4)
    ref, _ = get_dispatch("dense")(params["experts"], x, ffn_only, cfg)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux.experts_per_token, true.sum() / 64, rtol=1e-6)
    np.testing.assert_allclose(aux.zero_compute_fraction, (~true).sum() / true.size, rtol=1e-6)
    assert aux.load.shape == (8,)
    # tokens that chose only null experts get exactly zero
    only_null = ~some
    if only_null.any():
        assert np.abs(np.asarray(y)[only_null]).max() == 0
