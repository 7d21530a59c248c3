"""The soft mixture of attention experts (BAM) against a per-expert reference, forward and
gradient; identical experts equal one attention; configuration errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.nn import LMConfig, init_lm
from jmoe.nn.attention import AttentionConfig, causal_attention
from jmoe.nn.attention_experts import KV_NAMES, experts_from_attentions, router_probs

BASE = LMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32, max_seq_len=24)
X = jax.random.normal(jax.random.key(2), (2, 12, 16))
POS = jnp.broadcast_to(jnp.arange(12), (2, 12))


def _cfg(**attention):
    return BASE.replace(attention=AttentionConfig(**attention))


def _single(cfg):
    return cfg.replace(attention=dataclasses.replace(cfg.attention, experts=0, shared_kv=False))


def _expert(params, a, shared):
    return {k: v if shared and k in KV_NAMES else jax.tree.map(lambda z: z[a], v)
            for k, v in params.items() if k != "router"}


def reference(params, x, cfg):
    """sum_a p_a(x) * attention_a(x), one expert at a time."""
    probs = router_probs(params, x)
    single = _single(cfg)
    return sum(probs[..., a, None] * causal_attention(_expert(params, a, cfg.attention.shared_kv), x, POS, single)
               for a in range(cfg.attention.experts))


@pytest.mark.parametrize("attention", [dict(experts=3), dict(experts=3, shared_kv=True),
                                       dict(experts=2, qk_norm="head", qkv_bias=True),
                                       dict(experts=4, shared_kv=True, qk_norm="full")])
def test_equals_the_per_expert_reference_forward_and_gradient(attention):
    cfg = _cfg(**attention)
    params = init_lm(jax.random.key(0), cfg)["layers"]["0"]["attn"]
    if "bq" in params:  # non-zero biases, so that a wrong head order shows
        params = {**params, "bq": 0.1 * jax.random.normal(jax.random.key(3), params["bq"].shape),
                  "bk": 0.1 * jax.random.normal(jax.random.key(4), params["bk"].shape)}
    fast = jax.jit(lambda p, x: causal_attention(p, x, POS, cfg))
    np.testing.assert_allclose(fast(params, X), reference(params, X, cfg), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda p: jnp.sum(jnp.sin(f(p, X)))
    g_fast = jax.grad(loss(fast))(params)
    g_ref = jax.grad(loss(lambda p, x: reference(p, x, cfg)))(params)
    for path, a in jax.tree_util.tree_flatten_with_path(g_fast)[0]:
        b = g_ref
        for k in path:
            b = b[k.key]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
        assert float(jnp.abs(a).max()) > 0, jax.tree_util.keystr(path)  # the router and every expert learn


@pytest.mark.parametrize("shared_kv", [False, True])
def test_copies_of_one_attention_equal_it_under_any_router(shared_kv):
    one = init_lm(jax.random.key(0), BASE)["layers"]["0"]["attn"]
    router = jax.random.normal(jax.random.key(5), (16, 3))
    params = experts_from_attentions([one] * 3, router, shared_kv=shared_kv)
    cfg = _cfg(experts=3, shared_kv=shared_kv)
    np.testing.assert_allclose(causal_attention(params, X, POS, cfg), causal_attention(one, X, POS, BASE),
                               rtol=1e-5, atol=1e-5)


def test_shared_kv_averages_the_experts_keys_and_values():
    attns = [init_lm(jax.random.key(s), BASE)["layers"]["0"]["attn"] for s in range(2)]
    params = experts_from_attentions(attns, jnp.zeros((16, 2)), shared_kv=True)
    np.testing.assert_allclose(params["wk"], (attns[0]["wk"] + attns[1]["wk"]) / 2, rtol=1e-6)
    np.testing.assert_array_equal(params["wq"][1], attns[1]["wq"])
    with pytest.raises(ValueError, match="router_w has shape"):
        experts_from_attentions(attns, jnp.zeros((16, 3)))


def test_a_language_model_with_attention_experts_trains():
    cfg = _cfg(experts=2, shared_kv=True)
    params = init_lm(jax.random.key(0), cfg)
    assert cfg.num_params() == cfg.num_params(active=True)  # soft routing: every expert runs
    assert cfg.num_params() > BASE.num_params()
    from jmoe.nn import lm_apply

    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 32)
    loss = lambda p: jnp.mean(jax.nn.log_softmax(lm_apply(p, tokens, cfg)[0])[..., 0])
    g = jax.grad(loss)(params)
    assert float(jnp.abs(g["layers"]["1"]["attn"]["router"]["w"]).max()) > 0
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    assert "experts" not in BASE.to_dict()["attention"]  # one attention's config reads as before


@pytest.mark.parametrize("attention, match", [
    (dict(experts=1), "experts >= 2"),
    (dict(kind="mla", kv_lora_rank=4, qk_rope_head_dim=4, v_head_dim=4, experts=2), "kind 'gqa'"),
    (dict(shared_kv=True), "needs attention experts"),
    (dict(experts=-1), "experts"),
])
def test_bad_configurations_are_refused(attention, match):
    with pytest.raises(ValueError, match=match):
        AttentionConfig(**attention)


def test_what_attention_experts_cannot_do_is_refused():
    from jmoe.adapters import AdapterConfig
    from jmoe.io import hf

    cfg = _cfg(experts=2)
    with pytest.raises(ValueError, match="attention experts, which take no attention LoRA"):
        cfg.replace(adapter=AdapterConfig(kind="lora", rank=2, attn_targets=("wq",)))
    cfg.replace(adapter=AdapterConfig(kind="lora", rank=2))  # FFN adapters are fine
    with pytest.raises(ValueError, match="no Hugging Face architecture holds"):
        hf.save("/nonexistent", cfg, init_lm(jax.random.key(0), cfg), architecture="llama")
