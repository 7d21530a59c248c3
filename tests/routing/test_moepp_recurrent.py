import jax
import jax.numpy as jnp
import numpy as np

import jmoe
from jmoe import MoEConfig
from jmoe.dispatch import get_dispatch
from jmoe.routing.moepp import moepp_route
from jmoe.routing.recurrent import gru_cell
from tests.util import jit_lm_apply

CFG = MoEConfig(router="moepp", num_experts=4, top_k=2, d_model=8, d_ff=16,
                router_options=dict(num_zero_experts=1, num_copy_experts=1, num_constant_experts=1, gating_residual=True))


def forced_router(params, choice_a, choice_b):
    """Router weights that make every token pick choices a and b (x > 0)."""
    w = jnp.zeros_like(params["router"]["w"]).at[:, choice_a].set(3.0).at[:, choice_b].set(2.0)
    return {**params, "router": {**params["router"], "w": w}}


def test_zero_copy_and_constant_experts():
    params = jmoe.init_moe(jax.random.key(0), CFG)
    assert params["router"]["w"].shape == (8, 7) and params["router"]["gate_map"].shape == (7, 7)
    x = jnp.abs(jax.random.normal(jax.random.key(1), (12, 8))) + 0.1
    E = 4
    # FFN expert 1 + zero expert: the zero expert's weight is dropped, expert 1 gets weight 1
    p = forced_router(params, 1, E)
    y, aux = jmoe.moe_layer(p, x, CFG)
    one = jax.tree.map(lambda a: a[1], params["experts"])
    np.testing.assert_allclose(y, jmoe.experts.ffn(one, x, "swiglu"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux.experts_per_token, 1.0)
    np.testing.assert_allclose(aux.zero_compute_fraction, 0.5)
    # copy + constant only: no FFN expert runs, y = w_copy x + w_const (a1 x + a2 v)
    p = forced_router(params, E + 1, E + 2)
    y, aux = jmoe.moe_layer(p, x, CFG)
    r = moepp_route(p["router"], x, CFG)
    w = np.asarray(r.weights)
    a = jax.nn.softmax(x @ params["router"]["const_w"][0], axis=-1)
    v = params["router"]["const_v"][0]
    expected = w[:, :1] * x + w[:, 1:] * (a[:, :1] * x + a[:, 1:] * v)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert float(aux.experts_per_token) == 0.0


def test_gating_residual_uses_the_previous_logits():
    params = jmoe.init_moe(jax.random.key(0), CFG)
    params["router"]["gate_map"] = jnp.eye(7) * 0.5
    x = jax.random.normal(jax.random.key(1), (6, 8))
    prev = jax.random.normal(jax.random.key(2), (6, 7))
    r0 = moepp_route(params["router"], x, CFG)
    r1 = moepp_route(params["router"], x, CFG, carry=prev)
    np.testing.assert_allclose(r1.logits, r0.logits + 0.5 * prev, rtol=1e-5, atol=1e-6)
    assert r1.carry.shape == (6, 7)
    # through the layer and its gradient
    g = jax.jit(jax.grad(lambda p: jnp.sum(jmoe.moe_layer(p, x, CFG, carry=prev)[0])))(params)
    assert float(jnp.abs(g["router"]["gate_map"]).sum()) > 0


def test_moepp_balance_weights_flop_free_experts_by_tau():
    cfg = CFG.replace(router_options=dict(zero_compute_loss_weight=0.0, gating_residual=False))
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (50, 8))
    _, aux = jmoe.moe_layer(params, x, cfg)
    counts = np.asarray(aux.tokens_per_expert)
    P = np.asarray(aux.routing.probs).mean(0)
    f = counts / counts.sum()
    np.testing.assert_allclose(aux.balance_loss, 7 * np.sum(f[:4] * P[:4]), rtol=1e-5)


def test_recurrent_router_carries_state_between_layers():
    cfg = MoEConfig(router="recurrent", num_experts=4, top_k=2, d_model=8, d_ff=16, router_options=dict(recurrent_dim=6))
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (5, 8))
    _, aux0 = jmoe.moe_layer(params, x, cfg)
    h0 = aux0.routing.carry
    assert h0.shape == (5, 6)
    _, aux1 = jmoe.moe_layer(params, x, cfg, carry=h0)
    assert not np.allclose(aux1.routing.logits, aux0.routing.logits)
    # the cell is a standard GRU
    p = params["router"]["gru"]
    xi = np.asarray(x @ params["router"]["w_in"])
    h = np.asarray(h0)
    gx, gh = xi @ np.asarray(p["w_x"]) + np.asarray(p["b_x"]), h @ np.asarray(p["w_h"]) + np.asarray(p["b_h"])
    sig = lambda v: 1 / (1 + np.exp(-v))
    r, z = sig(gx[:, :6] + gh[:, :6]), sig(gx[:, 6:12] + gh[:, 6:12])
    n = np.tanh(gx[:, 12:] + r * gh[:, 12:])
    np.testing.assert_allclose(aux1.routing.carry, (1 - z) * n + z * h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gru_cell(p, jnp.asarray(xi), h0), aux1.routing.carry, rtol=1e-5)


def test_lm_passes_the_carry_through_layers():
    from jmoe.nn import LMConfig, init_lm

    moe = MoEConfig(router="recurrent", num_experts=4, top_k=2, d_model=16, d_ff=8, router_options=dict(recurrent_dim=4))
    cfg = LMConfig(d_model=16, n_layers=3, n_heads=2, d_ff=16, moe=moe)
    params = init_lm(jax.random.key(0), cfg)
    _, aux = jit_lm_apply(params, jnp.zeros((2, 5), jnp.int32), cfg)
    assert all(a.routing.carry.shape == (10, 4) for a in aux.moe)
