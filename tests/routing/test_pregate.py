"""Pre-gating (`pregate`, Read-ME): every MoE layer routes the first MoE layer's input; the
cross-layer gate then knows every layer's experts exactly, and offloading prefetches them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig
from jmoe.infer import Engine
from jmoe.infer.offload import OffloadedEngine
from jmoe.infer.predict import gate_accuracy
from jmoe.nn import init_lm, lm_apply
from jmoe.routing.topk import topk_route
from tests.infer.test_engine import BASE, assert_cached_decode_is_the_full_forward

CFG = BASE.replace(n_layers=4, moe=BASE.moe.replace(router="pregate"))
PROMPTS = [[3, 5, 7, 9, 11, 2, 4], [1, 2], [40, 41, 42, 43, 44, 45, 46, 47, 1, 2, 3, 4, 5]]


def test_every_layer_routes_the_first_moe_layers_input():
    params = init_lm(jax.random.key(0), CFG)
    tokens = jnp.asarray([[1, 5, 9, 2, 7, 3]], jnp.int32)
    _, aux = lm_apply(params, tokens, CFG, keep_moe_inputs=True)
    first = aux.moe_inputs[0].reshape(-1, CFG.d_model)
    for j, i in enumerate(CFG.moe_layers):
        want = topk_route(params["layers"][str(i)]["moe"]["router"], first, CFG.moe_for(i))
        np.testing.assert_array_equal(aux.moe[j].routing.expert_ids, want.expert_ids)
        np.testing.assert_allclose(aux.moe[j].routing.weights, want.weights, rtol=1e-6)
    # gradients reach every layer's router through the shared input
    def loss(p):
        logits, aux = lm_apply(p, tokens, CFG)
        return jnp.mean(logits) + sum(a.loss for a in aux.moe)

    g = jax.grad(loss)(params)
    assert all(float(jnp.abs(g["layers"][str(i)]["moe"]["router"]["w"]).sum()) > 0 for i in CFG.moe_layers)


def test_cached_decoding_is_the_full_forward():
    params = init_lm(jax.random.key(1), CFG)
    assert_cached_decode_is_the_full_forward(CFG, params, PROMPTS, 5)


def test_the_gate_is_exact_and_offloading_hits():
    params = init_lm(jax.random.key(2), CFG)
    tokens = np.random.default_rng(0).integers(0, 48, (2, 12)).astype(np.int32)
    L = len(CFG.moe_layers)
    acc = gate_accuracy(CFG, params, {}, tokens, lookaheads=(1, L - 1))
    assert acc[1][1:] == [1.0] * (L - 1) and acc[L - 1][L - 1] == 1.0
    plain = gate_accuracy(BASE.replace(n_layers=4), params, {}, tokens, lookaheads=(1,))
    assert min(plain[1][1:]) < 1.0  # a layer's own router on the previous input only guesses

    ref, _ = Engine(CFG, params).generate(PROMPTS[:1], max_new_tokens=8)
    hit = {}
    for prefetch in ("gate", "none"):
        lm = OffloadedEngine(CFG, params, batch_size=1, cache_size=2, policy="lru", prefetch=prefetch)
        gens, _ = lm.generate(PROMPTS[:1], max_new_tokens=8)
        assert [g.token_ids for g in gens] == [g.token_ids for g in ref]
        hit[prefetch] = lm.offload_stats.decode_hit_rate
    # the prefetched experts of every later MoE layer are the ones needed: only the first one misses
    assert hit["gate"] >= (L - 1) / L and hit["gate"] > hit["none"]


def test_a_carry_of_another_shape_is_refused():
    from jmoe.routing.pregate import pregate_route

    moe = MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=8, router="pregate")
    params = {"w": jnp.zeros((8, 4))}
    with pytest.raises(ValueError, match="every MoE layer of the model must use it"):
        pregate_route(params, jnp.zeros((3, 8)), moe, carry=jnp.zeros((3, 2)))
