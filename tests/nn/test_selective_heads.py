"""Selective multi-head attention (`jmoe.nn.selective_heads`, Union of Experts' SMHA): the
layer equals plain attention with each token's unselected heads removed, for token and
expert selection; the router trains through the straight-through gate; cached decoding equals
full forwards; expert selection is refused where it would leak the future."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig
from jmoe.infer import Engine
from jmoe.nn import LMConfig, init_lm
from jmoe.nn.attention import AttentionConfig, attention_heads, causal_attention
from jmoe.nn.selective_heads import head_probs, head_selection
from tests.util import greedy_by_full_forwards

MOE = MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8)


def _cfg(k=2, selection="token", **kw):
    acfg = AttentionConfig(head_top_k=k, head_selection=selection, allow_noncausal=selection == "expert")
    return LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, d_ff=16, max_seq_len=32, moe=MOE,
                    attention=acfg, **kw)


def _reference(params, x, cfg, chosen):
    """Plain attention with the output projection summed over each token's chosen heads only."""
    heads = attention_heads(params, x, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]), cfg)
    out = jnp.zeros(x.shape)
    for h in range(cfg.n_heads):
        out = out + jnp.where(chosen[..., h:h + 1], heads[:, :, h] @ params["wo"][h], 0.0)
    return out


@pytest.mark.parametrize("selection", ["token", "expert"])
def test_the_layer_is_attention_over_the_selected_heads(selection):
    cfg = _cfg(2, selection)
    params = init_lm(jax.random.key(0), cfg)["layers"]["0"]["attn"]
    x = jax.random.normal(jax.random.key(1), (2, 12, 16))
    chosen = head_selection(head_probs(params["head_router"], x), 2, selection)
    if selection == "token":
        assert np.all(np.sum(chosen, -1) == 2)
    else:  # every head takes ceil(12 * 2 / 4) = 6 tokens of each sequence
        assert np.all(np.sum(chosen, 1) == 6)
    got = causal_attention(params, x, jnp.broadcast_to(jnp.arange(12), (2, 12)), cfg)
    np.testing.assert_allclose(got, _reference(params, x, cfg, chosen), rtol=1e-5, atol=1e-5)


def test_all_heads_selected_is_plain_attention_and_the_router_learns():
    full, plain = _cfg(4), _cfg(0)
    params = init_lm(jax.random.key(0), full)["layers"]["0"]["attn"]
    x = jax.random.normal(jax.random.key(1), (2, 8, 16))
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    base = {k: v for k, v in params.items() if k != "head_router"}
    np.testing.assert_allclose(causal_attention(params, x, pos, full), causal_attention(base, x, pos, plain), rtol=1e-6)

    cfg = _cfg(2)
    g = jax.grad(lambda p: jnp.sum(causal_attention(p, x, pos, cfg) ** 2))(params)
    assert float(jnp.abs(g["head_router"]["w"]).max()) > 0


def test_cached_decoding_equals_full_forwards():
    cfg = _cfg(2)
    params = init_lm(jax.random.key(3), cfg)
    prompts = [[3, 5, 7, 9], [1, 2]]
    gens, _ = Engine(cfg, params).generate(prompts, max_new_tokens=6)
    for p, g in zip(prompts, gens):
        assert list(g.token_ids) == greedy_by_full_forwards(params, cfg, p, 6)


def test_config_checks_and_active_parameters():
    with pytest.raises(ValueError, match="head_top_k=5 exceeds n_heads=4"):
        _cfg(5)
    with pytest.raises(ValueError, match="not causal"):
        AttentionConfig(head_top_k=2, head_selection="expert")
    with pytest.raises(ValueError, match="need kind 'gqa'"):
        AttentionConfig(head_top_k=2, experts=2)
    with pytest.raises(ValueError, match="cannot decode"):
        Engine(_cfg(2, "expert"), init_lm(jax.random.key(0), _cfg(2, "expert")))
    assert "head_top_k" not in _cfg(0).to_dict()["attention"]
    assert LMConfig.from_dict(_cfg(2).to_dict()) == _cfg(2)
    half, full = _cfg(2), _cfg(4)
    qo = 2 * half.n_layers * 16 * 2 * 4  # wq and wo of the two unselected heads, per layer
    assert full.num_params(active=True) - half.num_params(active=True) == qo
    assert full.num_params() == half.num_params()
