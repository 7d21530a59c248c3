"""Attention with a KV cache: prefill a prompt, then attend new tokens over the cache.

Prefill computes the prompt's attention exactly as training does (`jmoe.nn.attention`) and
returns what the cache keeps. A cached step writes the new tokens' entries at their
positions and attends each query to the cached keys at positions up to its own.

Multi-head latent attention decodes with the absorbed projections of DeepSeek's inference
code: the key half of `wkv_b` is folded into the query (q_nope W_uk: [B, S, H, rkv]) and the
value half applied after the weighted sum of latents, so the per-head keys and values are
never expanded from the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.infer.cache import write
from jmoe.nn.attention import (
    attention_out, attention_qkv, causal_attend, mla_keys_values, mla_projections, mla_scale,
    blockwise_causal_attention,
)


def _project_out(params: dict, heads: jax.Array) -> jax.Array:
    return jnp.einsum("bshk,hkd->bsd", heads, params["wo"].astype(heads.dtype))


def prefill_attention(params: dict, x: jax.Array, positions: jax.Array, cfg) -> tuple[jax.Array, dict]:
    """Causal attention over a whole prompt batch and the entries to cache.

    x: [B, P, d]; positions: [B, P] -> ([B, P, d], {name: [B, P, ...]}) with the names of
    `jmoe.infer.cache.layer_shapes`.
    """
    if cfg.attention.kind == "mla":
        q_nope, q_rope, latent, k_rope = mla_projections(params, x, positions, cfg)
        k, v = mla_keys_values(params, latent, k_rope, cfg)
        heads = blockwise_causal_attention(jnp.concatenate([q_nope, q_rope], axis=-1), k, v, mla_scale(cfg))
        return _project_out(params, heads), {"latent": latent, "k_rope": k_rope}
    q, k, v = attention_qkv(params, x, positions, cfg)
    return attention_out(params, causal_attend(q, k, v, cfg.attention.softmax_scale), x, cfg), {"k": k, "v": v}


def _visible(positions: jax.Array, max_len: int) -> jax.Array:
    """[B, 1, n, S] True where cache position t <= the query's position."""
    return (jnp.arange(max_len)[None, None, :] <= positions[:, :, None])[:, None]


def cached_attention(params: dict, x: jax.Array, positions: jax.Array, entry: dict, cfg) -> tuple[jax.Array, dict]:
    """New tokens attend over the cache (their own entries included).

    x: [B, n, d] new tokens at positions [B, n]; entry: the layer's cache ({name: [B, S, ...]}).
    Returns ([B, n, d], the entry with the new tokens written). Logits and softmax in float32.
    """
    dt = x.dtype
    if cfg.attention.kind == "mla":
        Dn = cfg.attention.qk_nope_head_dim
        q_nope, q_rope, latent, k_rope = mla_projections(params, x, positions, cfg)
        entry = {"latent": write(entry["latent"], latent, positions), "k_rope": write(entry["k_rope"], k_rope, positions)}
        w = params["wkv_b"].astype(dt)  # [rkv, H, Dn + Dv]
        q_latent = jnp.einsum("bshn,rhn->bshr", q_nope, w[..., :Dn])
        logits = (jnp.einsum("bshr,btr->bhst", q_latent, entry["latent"], preferred_element_type=jnp.float32)
                  + jnp.einsum("bshe,bte->bhst", q_rope, entry["k_rope"], preferred_element_type=jnp.float32))
        logits = logits * mla_scale(cfg)
        probs = jax.nn.softmax(jnp.where(_visible(positions, logits.shape[-1]), logits, -jnp.inf), axis=-1)
        out_latent = jnp.einsum("bhst,btr->bshr", probs, entry["latent"].astype(jnp.float32))
        heads = jnp.einsum("bshr,rhv->bshv", out_latent.astype(dt), w[..., Dn:])
        return _project_out(params, heads), entry
    q, k, v = attention_qkv(params, x, positions, cfg)
    entry = {"k": write(entry["k"], k, positions), "v": write(entry["v"], v, positions)}
    B, n, H, D = q.shape
    Hkv = k.shape[2]
    scale = cfg.attention.softmax_scale or D**-0.5
    qg = q.reshape(B, n, Hkv, H // Hkv, D)
    logits = jnp.einsum("bshgd,bthd->bhgst", qg, entry["k"], preferred_element_type=jnp.float32) * scale
    visible = _visible(positions, logits.shape[-1])[:, :, None]  # [B, 1, 1, n, S]
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    heads = jnp.einsum("bhgst,bthd->bshgd", probs, entry["v"].astype(jnp.float32)).reshape(B, n, H, D)
    return attention_out(params, heads.astype(dt), x, cfg), entry
