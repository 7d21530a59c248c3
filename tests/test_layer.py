import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe import MoEConfig, init_moe, moe_layer
from tests.util import tree_allclose

BASE = MoEConfig(num_experts=6, top_k=2, d_model=8, d_ff=12, dispatch_options=dict(block_size=8), num_shared_experts=1, d_ff_shared=4)


def layer_grads(cfg, params, x, key=None):
    def f(params, x):
        y, aux = moe_layer(params, x, cfg, key=key)
        return jnp.sum(jnp.sin(y)) + aux.loss, (y, aux)

    (_, (y, aux)), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)
    return y, aux, g


@pytest.mark.parametrize(
    "changes",
    [
        dict(dispatch="dropless"),
        dict(dispatch="dropless", dispatch_options=dict(impl="ragged_dot", block_size=8)),
        dict(dispatch="dropless", dispatch_options=dict(impl="pallas", block_size=8)),
        dict(dispatch="capacity", dispatch_options=dict(capacity_factor=6.0)),
        dict(dispatch="dropless", router_options=dict(renormalize=True), activation="geglu", num_shared_experts=0),
    ],
)
def test_layer_matches_reference_forward_and_gradients(changes):
    cfg = BASE.replace(**changes)
    params = init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (3, 7, cfg.d_model))
    y_ref, aux_ref, g_ref = layer_grads(cfg.replace(dispatch="dense"), params, x)
    y, aux, g = layer_grads(cfg, params, x)
    assert y.shape == x.shape
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(aux.loss, aux_ref.loss, rtol=1e-6)
    assert float(aux.dropped_fraction) == 0.0
    tree_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
    assert set(g[0]) == set(params)  # every parameter group got a gradient
    assert all(float(jnp.abs(l).sum()) > 0 for l in jax.tree.leaves(g[0]))


def test_all_tokens_to_one_expert_through_the_router():
    cfg = BASE.replace(top_k=1, num_shared_experts=0)
    params = init_moe(jax.random.key(0), cfg)
    params["router"]["w"] = jnp.zeros_like(params["router"]["w"]).at[:, 4].set(10.0)
    x = jnp.abs(jax.random.normal(jax.random.key(1), (33, cfg.d_model))) + 0.1
    y_ref, _, g_ref = layer_grads(cfg.replace(dispatch="dense"), params, x)
    y, aux, g = layer_grads(cfg, params, x)
    np.testing.assert_array_equal(aux.tokens_per_expert, [0, 0, 0, 0, 33, 0])
    np.testing.assert_allclose(aux.balance_loss, cfg.num_experts * float(aux.routing.probs[:, 4].mean()), rtol=1e-5)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    tree_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


def test_aux_contents():
    cfg = BASE.replace(dispatch="capacity", dispatch_options=dict(capacity_factor=0.5))
    params = init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (40, cfg.d_model))
    _, aux = jax.jit(lambda p, x: moe_layer(p, x, cfg))(params, x)
    assert aux.load.shape == (6,) and abs(float(aux.load.sum()) - 1) < 1e-6
    assert float(aux.tokens_per_expert.sum()) == 80
    assert 0 < float(aux.dropped_fraction) < 1
    np.testing.assert_allclose(aux.loss, cfg.aux_loss_coef * aux.balance_loss + cfg.z_loss_coef * aux.z_loss, rtol=1e-6)
    assert float(aux.router_entropy) > 0 and float(aux.max_violation) >= 0
    assert aux.routing.expert_ids.shape == (40, 2)


def test_vmap_equals_flattened_batch():
    cfg = BASE
    params = init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (4, 5, cfg.d_model))
    y_flat, _ = moe_layer(params, x, cfg)
    y_vmap, aux = jax.vmap(lambda xb: moe_layer(params, xb, cfg))(x)
    np.testing.assert_allclose(y_vmap, y_flat, rtol=1e-5, atol=1e-6)
    assert aux.load.shape == (4, 6)


def test_bfloat16_input():
    cfg = BASE
    params = init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (16, cfg.d_model))
    y32, _ = moe_layer(params, x, cfg)
    y16, aux = jax.jit(lambda p, x: moe_layer(p, x, cfg))(params, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16 and aux.routing.probs.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05, rtol=0.05)
    g = jax.grad(lambda p: jnp.sum(moe_layer(p, x.astype(jnp.bfloat16), cfg)[0].astype(jnp.float32)))(params)
    assert all(np.isfinite(np.asarray(l, np.float32)).all() for l in jax.tree.leaves(g))


def test_compute_dtype_from_config():
    cfg = BASE.replace(dtype="bfloat16")
    params = init_moe(jax.random.key(0), cfg)
    y, _ = moe_layer(params, jnp.ones((3, cfg.d_model)), cfg)
    assert y.dtype == jnp.bfloat16


def test_jitter_changes_routing_only_with_key():
    cfg = BASE.replace(router_jitter=0.5)
    params = init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (64, cfg.d_model))
    y0, _ = moe_layer(params, x, cfg)
    y1, _ = moe_layer(params, x, cfg.replace(router_jitter=0.0))
    np.testing.assert_array_equal(y0, y1)
    y2, _ = moe_layer(params, x, cfg, key=jax.random.key(3))
    assert not np.allclose(y2, y0)


def test_bad_inputs_raise_value_errors_naming_the_argument():
    cfg = BASE
    params = init_moe(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match="d_model=8"):
        moe_layer(params, jnp.ones((3, 7)), cfg)
    with pytest.raises(ValueError, match="floating"):
        moe_layer(params, jnp.ones((3, 8), jnp.int32), cfg)
    with pytest.raises(ValueError, match="top_k"):
        cfg.replace(top_k=7)
    with pytest.raises(ValueError, match="router"):
        cfg.replace(router="nope")
    with pytest.raises(ValueError, match="dispatch"):
        cfg.replace(dispatch="nope")
    with pytest.raises(ValueError, match=r"params\['experts'\]\['w_up'\]"):
        moe_layer(params, jnp.ones((3, 8)), cfg.replace(d_ff=16))
    with pytest.raises(ValueError, match="cfg"):
        moe_layer(params, jnp.ones((3, 8)), {"num_experts": 6})
    with pytest.raises(ValueError, match="'shared'"):
        moe_layer({k: v for k, v in params.items() if k != "shared"}, jnp.ones((3, 8)), cfg)
    x = jnp.ones((3, 8))
    wide = {**params, "router": {"w": jnp.zeros((8, 7)).at[:, 6].set(10.0)}}  # would route to an expert 6
    with pytest.raises(ValueError, match=r"params\['router'\]\['w'\] has shape \(8, 7\), expected \(8, 6\)"):
        moe_layer(wide, x, cfg)
    with pytest.raises(ValueError, match=r"params\['router'\]\['w'\] is missing"):
        moe_layer({**params, "router": {}}, x, cfg)
    with pytest.raises(ValueError, match="no tokens to route"):
        moe_layer(params, jnp.ones((0, 8)), cfg)
    with pytest.raises(ValueError, match="key must be a PRNG key .* got int 0"):
        init_moe(0, cfg)
    with pytest.raises(ValueError, match="key must be a PRNG key .* got int 5"):
        moe_layer(params, x, cfg, key=5)
    moe_layer(params, x, cfg, key=jax.random.PRNGKey(0))  # raw keys are keys too


def test_init_tree_and_dtypes():
    cfg = BASE.replace(param_dtype="bfloat16")
    params = init_moe(jax.random.key(0), cfg)
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {
        "router": {"w": (8, 6)},
        "experts": {"w_gate": (6, 8, 12), "w_up": (6, 8, 12), "w_down": (6, 12, 8)},
        "shared": {"w_gate": (8, 4), "w_up": (8, 4), "w_down": (4, 8)},
    }
    assert all(l.dtype == jnp.bfloat16 for l in jax.tree.leaves(params))
    assert jmoe.init_moe_state(cfg) is None
