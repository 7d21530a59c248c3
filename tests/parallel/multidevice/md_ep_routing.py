"""The routing zoo, merged experts and shared experts through the expert-parallel layer on 8
simulated CPU devices, against one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe.parallel import ExpertParallel, make_mesh
from tests.parallel.multidevice.md_expert_parallel import CFG, T, assert_same, expert_parallel, single_device


@pytest.mark.parametrize(
    "changes",
    [
        dict(router="sigmoid_bias", router_options=dict(expert_groups=4, topk_groups=2), balance_loss="seq_aux"),
        dict(router="moepp", router_options=dict(num_zero_experts=1, num_copy_experts=1, num_constant_experts=2,
                                                gating_residual=True)),
        dict(router="null_experts", router_options=dict(num_null_experts=4)),
        dict(router="top_p", top_k=4, router_options=dict(threshold=0.3), entropy_loss_coef=0.1, balance_scope="sequence"),
        dict(router="recurrent", router_options=dict(recurrent_dim=8), balance_loss="device", balance_options=dict(devices=4)),
    ],
)
def test_routing_zoo_on_a_mesh_equals_one_device(changes):
    cfg = CFG.replace(**changes)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    state = jmoe.init_moe_state(cfg)
    x = jax.random.normal(jax.random.key(1), (8, 8, cfg.d_model))  # 8 sequences of 8 tokens
    C = cfg.num_choices
    carry = jax.random.normal(jax.random.key(2), (64, cfg.router_options.recurrent_dim if cfg.router == "recurrent" else C))
    carry = carry if cfg.router in ("moepp", "recurrent") else None
    if state is not None:
        state = {"bias": jax.random.normal(jax.random.key(3), (cfg.num_experts,)) * 0.1}
    ep = ExpertParallel(make_mesh("data=2,expert=4"), impl="padded")

    def run(ep):
        def f(p, x):
            y, aux = jmoe.moe_layer(p, x, cfg, state=state, carry=carry, ep=ep)
            return jnp.sum(jnp.sin(y)) + aux.loss, (y, aux)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)

    single, parallel = run(None), run(ep)
    assert_same(single, parallel)
    (_, (_, a0)), _ = single
    (_, (_, a1)), _ = parallel
    np.testing.assert_allclose(a1.tokens_per_expert, a0.tokens_per_expert)
    np.testing.assert_allclose(a1.experts_per_token, a0.experts_per_token, rtol=1e-6)
    if a0.routing.carry is not None:
        np.testing.assert_allclose(a1.routing.carry, a0.routing.carry, rtol=1e-5, atol=1e-6)
    if state is not None:  # every device would apply the same bias update
        s0 = jmoe.layer.update_moe_state(state, a0, cfg)
        s1 = jmoe.layer.update_moe_state(state, a1, cfg)
        np.testing.assert_array_equal(s0["bias"], s1["bias"])


@pytest.mark.parametrize("impl", ["padded", "allgather"])
def test_merged_experts_with_an_expert_map_equal_one_device(impl):
    """A merged layer (8 router outputs sharing 4 experts) runs expert-parallel like on one device."""
    cfg = CFG.replace(num_experts=4, expert_map=(0, 1, 2, 3, 3, 2, 1, 0))
    params = jmoe.init_moe(jax.random.key(0), cfg)
    assert params["router"]["w"].shape[-1] == 8 and params["experts"]["w_up"].shape[0] == 4
    x = jax.random.normal(jax.random.key(1), (T, cfg.d_model))
    ep = ExpertParallel(make_mesh("data=2,expert=4"), impl=impl)
    assert_same(single_device(cfg, params, x), expert_parallel(cfg, params, x, ep))


# ------------------------------------------------- one layer body on one device and on a mesh


@pytest.mark.parametrize("impl,dtype", [("padded", "bfloat16"), ("ragged", "bfloat16"), ("allgather", "float32")])
def test_shared_gate_and_dtype_equal_one_device(impl, dtype):
    """Shared experts with a gate, in float32 and bfloat16, through each exchange."""
    cfg = CFG.replace(num_shared_experts=1, d_ff_shared=16, shared_gate=True, dtype=dtype)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    assert "shared_gate" in params
    x = jax.random.normal(jax.random.key(1), (4, T // 4, cfg.d_model))
    ep = ExpertParallel(make_mesh("data=2,expert=4"), impl=impl)
    single, parallel = single_device(cfg, params, x), expert_parallel(cfg, params, x, ep)
    assert parallel[0][1][0].dtype == jnp.dtype(dtype)
    if dtype == "float32":
        assert_same(single, parallel)
    else:  # the same operations, rounded to bfloat16 at the same places up to summation order
        assert_same(single, parallel, rtol=2e-2, atol=2e-2, grad_rtol=2e-2, grad_atol=2e-2)
