"""Every dropless implementation equals the run-every-expert reference, forward and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jmoe
from jmoe import MoEConfig
from jmoe.dispatch import chunked_expert_combine, get_dispatch, sort_slots
from jmoe.dispatch.chunked import chunk_sizes
from tests.util import init_experts, make_routing, tree_allclose

D, F = 6, 10


def run(dispatch_name, params, x, routing, cfg):
    return get_dispatch(dispatch_name)(params, x, routing, cfg)[0]


def output_and_grads(dispatch_name, params, x, routing, cfg, probe):
    """(y, d<y, probe>/d(params, x, weights)) in one compiled call."""

    def f(params, x, weights):
        y = run(dispatch_name, params, x, routing.replace(weights=weights), cfg)
        return jnp.sum(y.astype(jnp.float32) * probe), y

    (_, y), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(params, x, routing.weights)
    return y, grads


def check_against_reference(cfg, routing, impls, seed=0, rtol=2e-5, atol=2e-5):
    T = routing.num_tokens
    k_p, k_x, k_r = jax.random.split(jax.random.key(seed), 3)
    params = init_experts(k_p, cfg)
    x = jax.random.normal(k_x, (T, cfg.d_model))
    probe = jax.random.normal(k_r, (T, cfg.d_model))
    ref_y, ref_grads = output_and_grads("dense", params, x, routing, cfg, probe)
    for impl in impls:
        y, grads = output_and_grads("dropless", params, x, routing, cfg.replace(dispatch_options=dict(impl=impl)), probe)
        np.testing.assert_allclose(y, ref_y, rtol=rtol, atol=atol, err_msg=impl)
        tree_allclose(grads, ref_grads, rtol=1e-4, atol=1e-4)


@settings(max_examples=6)  # each example compiles both implementations, forward and gradient
@given(
    E=st.integers(1, 64),
    k_frac=st.floats(0, 1),
    T=st.integers(1, 48),
    block=st.sampled_from([8, 16, 24]),
    mask_prob=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_dropless_matches_reference(E, k_frac, T, block, mask_prob, seed):
    k = 1 + int(k_frac * (min(E, 8) - 1))
    cfg = MoEConfig(num_experts=E, top_k=k, d_model=D, d_ff=F, dispatch_options=dict(block_size=block))
    routing = make_routing(jax.random.key(seed), T, E, k, mask_prob=mask_prob)
    check_against_reference(cfg, routing, ["xla", "ragged_dot"], seed=seed)


@pytest.mark.parametrize("impl", ["xla", "ragged_dot"])
def test_all_tokens_to_one_expert_and_empty_experts(impl):
    E, T, k = 8, 37, 1
    cfg = MoEConfig(num_experts=E, top_k=k, d_model=D, d_ff=F, dispatch_options=dict(block_size=8))
    routing = make_routing(jax.random.key(0), T, E, k, expert_ids=jnp.full((T, 1), 5))
    check_against_reference(cfg, routing, [impl])
    # k=2: every token goes to the last two experts; experts 0..5 are empty.
    ids = jnp.tile(jnp.array([[7, 6]]), (T, 1))
    routing = make_routing(jax.random.key(1), T, E, 2, expert_ids=ids)
    check_against_reference(cfg.replace(top_k=2), routing, [impl])


def test_fully_masked_routing_gives_zero():
    cfg = MoEConfig(num_experts=4, top_k=2, d_model=D, d_ff=F, dispatch_options=dict(block_size=8))
    routing = make_routing(jax.random.key(0), 5, 4, 2, mask_prob=1.1)
    assert not routing.mask.any()
    params = init_experts(jax.random.key(1), cfg)
    y = run("dropless", params, jnp.ones((5, D)), routing, cfg)
    np.testing.assert_array_equal(y, 0.0)


@pytest.mark.parametrize("activation", ["geglu", "gelu"])
def test_other_activations(activation):
    cfg = MoEConfig(num_experts=5, top_k=2, d_model=D, d_ff=F, dispatch_options=dict(block_size=8), activation=activation)
    routing = make_routing(jax.random.key(3), 19, 5, 2)
    check_against_reference(cfg, routing, ["xla", "ragged_dot"])


def test_bfloat16_inputs():
    cfg = MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=16, dispatch_options=dict(block_size=8))
    routing = make_routing(jax.random.key(0), 21, 4, 2)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init_experts(jax.random.key(1), cfg))
    x = jax.random.normal(jax.random.key(2), (21, 8)).astype(jnp.bfloat16)
    probe = jnp.ones((21, 8))
    ref, g_ref = output_and_grads("dense", params, x, routing, cfg, probe)
    for impl in ["xla", "ragged_dot"]:
        y, g = output_and_grads("dropless", params, x, routing, cfg.replace(dispatch_options=dict(impl=impl)), probe)
        assert y.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), atol=5e-2, rtol=5e-2)
        assert g[0]["w_up"].dtype == jnp.bfloat16 and g[1].dtype == jnp.bfloat16
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            assert np.isfinite(a).all()
            np.testing.assert_allclose(a, b, atol=0.1 * np.abs(b).max() + 1e-3)


def test_chunked_op_directly_with_identity_experts():
    # expert e multiplies by (e + 1): y[t] = sum_j w_tj (e_tj + 1) x_t
    T, E, k = 11, 3, 2
    routing = make_routing(jax.random.key(0), T, E, k)
    order, sizes = sort_slots(routing.expert_ids, routing.mask, E)
    params = {"scale": jnp.arange(1.0, E + 1)}
    x = jax.random.normal(jax.random.key(1), (T, 4))
    y = chunked_expert_combine(x, routing.weights.reshape(-1), order, sizes, params, lambda p, xc: p["scale"] * xc, k, 8)
    expected = jnp.sum(routing.weights * (routing.expert_ids + 1.0), -1)[:, None] * x
    np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_chunk_sizes():
    assert chunk_sizes(512) == tuple(range(32, 513, 32))
    assert chunk_sizes(128) == tuple(range(8, 129, 8))
    assert chunk_sizes(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert chunk_sizes(8) == (1, 2, 4, 8)
    assert chunk_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert chunk_sizes(3) == (1, 2, 3)
    assert chunk_sizes(1) == (1,)


def test_sort_slots():
    ids = jnp.array([[2, 0], [0, 1], [2, 1]])
    mask = jnp.array([[True, True], [True, False], [True, True]])
    order, sizes = sort_slots(ids, mask, 3)
    np.testing.assert_array_equal(sizes, [2, 1, 2])
    np.testing.assert_array_equal(order, [1, 2, 5, 0, 4, 3])  # masked slot 3 last


def test_auto_impl_on_cpu_is_xla():
    assert jmoe.dispatch.resolve_impl("auto") == "xla"
    with pytest.raises(ValueError, match="dropless impl"):
        jmoe.dispatch.resolve_impl("cuda")
