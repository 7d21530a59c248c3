"""The ExpertList serving layout: every dispatch gives what it gives on stacked experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe import MoEConfig
from jmoe.dispatch import get_dispatch
from jmoe.dispatch.chunked import split_chunk_sizes
from jmoe.experts import ExpertList, num_experts_of, stacked_experts
from tests.util import init_experts, make_routing, tree_allclose

D, F = 6, 10


def output_and_grads(dispatch, params, x, routing, cfg, probe):
    def f(params, x, weights):
        y = get_dispatch(dispatch)(params, x, routing.replace(weights=weights), cfg)[0]
        return jnp.sum(y.astype(jnp.float32) * probe), y

    (_, y), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(params, x, routing.weights)
    return y, grads


def check_split_equals_stacked(cfg, routing, dispatch="dropless", seed=0):
    T = routing.num_tokens
    k_p, k_x, k_r = jax.random.split(jax.random.key(seed), 3)
    params = init_experts(k_p, cfg)
    x = jax.random.normal(k_x, (T, cfg.d_model))
    probe = jax.random.normal(k_r, (T, cfg.d_model))
    ref_y, (ref_dp, ref_dx, ref_dw) = output_and_grads("dense", params, x, routing, cfg, probe)
    y, (dp, dx, dw) = output_and_grads(dispatch, ExpertList.split(params), x, routing, cfg, probe)
    np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
    assert isinstance(dp, ExpertList) and dp.num_experts == cfg.num_experts
    tree_allclose((dp.stack(), dx, dw), (ref_dp, ref_dx, ref_dw), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("E,k,T,block,mask_prob", [
    (8, 2, 1, 32, 0.0),      # a decoding step at batch 1
    (8, 2, 8, 32, 0.0),      # batch 8: most experts get one or two slots
    (5, 3, 29, 8, 0.3),      # ragged groups longer than the block, masked slots
    (16, 4, 64, 512, 0.0),   # a prefill-sized step
])
def test_chunked_loop_on_expert_list(E, k, T, block, mask_prob):
    cfg = MoEConfig(num_experts=E, top_k=k, d_model=D, d_ff=F, dispatch_options=dict(block_size=block))
    check_split_equals_stacked(cfg, make_routing(jax.random.key(T), T, E, k, mask_prob=mask_prob))


def test_expert_list_edge_cases():
    E, T = 8, 37
    cfg = MoEConfig(num_experts=E, top_k=1, d_model=D, d_ff=F, dispatch_options=dict(block_size=8))
    # every token to expert 5: the others are empty, and expert 5's group spans many chunks
    check_split_equals_stacked(cfg, make_routing(jax.random.key(0), T, E, 1, expert_ids=jnp.full((T, 1), 5)))
    # a routing that picks one expert twice for a token (as a merged expert map can)
    ids = jnp.tile(jnp.array([[3, 3]]), (T, 1))
    check_split_equals_stacked(cfg.replace(top_k=2), make_routing(jax.random.key(1), T, E, 2, expert_ids=ids))
    # nothing selected
    routing = make_routing(jax.random.key(2), 5, E, 2, mask_prob=1.1)
    params = ExpertList.split(init_experts(jax.random.key(3), cfg))
    y = get_dispatch("dropless")(params, jnp.ones((5, D)), routing, cfg.replace(top_k=2))[0]
    np.testing.assert_array_equal(y, 0.0)


@pytest.mark.parametrize("dispatch,options", [("gather", {}), ("capacity", {}), ("dropless", {"impl": "ragged_dot"})])
def test_other_dispatches_take_the_list_stacked(dispatch, options):
    cfg = MoEConfig(num_experts=4, top_k=2, d_model=D, d_ff=F, dispatch=dispatch, dispatch_options=options)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (2, 7, D))
    y_ref, aux_ref = jmoe.moe_layer(params, x, cfg)
    y, aux = jmoe.moe_layer({**params, "experts": ExpertList.split(params["experts"])}, x, cfg)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux.dropped_fraction, aux_ref.dropped_fraction)


def test_layout_helpers_and_checks():
    cfg = MoEConfig(num_experts=3, top_k=2, d_model=D, d_ff=F)
    stacked = init_experts(jax.random.key(0), cfg)
    split = ExpertList.split(stacked)
    assert num_experts_of(split) == num_experts_of(stacked) == 3
    assert split.shapes == {n: tuple(w.shape) for n, w in stacked.items()}
    tree_allclose(stacked_experts(split), stacked, rtol=0, atol=0)
    assert stacked_experts(stacked) is stacked and ExpertList.split(split) is split
    assert split_chunk_sizes(1) == (1,) and split_chunk_sizes(32) == (2, 4, 8, 16, 32)
    with pytest.raises(ValueError, match="power of two"):
        split_chunk_sizes(24)
    wrong = ExpertList.split(init_experts(jax.random.key(0), cfg.replace(num_experts=2)))
    params = jmoe.init_moe(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match=r"params\['experts'\]\['w_\w+'\] has shape \(2, "):
        jmoe.moe_layer({**params, "experts": wrong}, jnp.ones((4, D)), cfg)
