"""Selective multi-head attention: the heads of an attention as experts (Union of Experts'
SMHA, Yang et al. 2025; reference code YujiaoYang-work/UoE `model/attention/SMHA_v*.py`).

A router over the heads, p = softmax(x W_r) [B, S, H] (float32), picks which heads work for
which tokens, in one of UoE's two paradigms:

  "token"   token selection: each token takes its top-k heads (the reference keeps H / 2);
            causal, so models decode with it.
  "expert"  expert selection: each head takes the ceil(S * k / H) tokens of its sequence
            with the highest probability for it (the same number of head-token pairs). A
            token's heads then depend on the later tokens of its sequence: not causal, so it
            needs `AttentionConfig.allow_noncausal` and cannot decode token by token.

A head that a token did not select contributes nothing to that token's output: its output
is multiplied by 0, the selected ones by 1, as in the reference's language model, where the
selected heads' outputs are scattered back unscaled. To train the router the multiplier is
1 + (p - stop_gradient(p)): 1 in the forward pass, the router probability's gradient in the
backward pass (a straight-through gate). Every token's keys and values are computed for every
head, so the KV cache and decoding are those of plain attention; the reference also restricts
a head's keys to the tokens that selected it (its compacted sequences), which this keeps
dense.

Parameters: `head_router {"w": [d, H]}` in the attention's parameters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SELECTIONS = ("token", "expert")


def init_head_router(key: jax.Array, d_model: int, n_heads: int, dtype="float32") -> dict:
    """{"w": [d, H]}: truncated normal with variance 0.1 / d (the Switch router init)."""
    std = (0.1 / d_model) ** 0.5
    return {"w": (std * jax.random.truncated_normal(key, -2.0, 2.0, (d_model, n_heads))).astype(dtype)}


def head_probs(router: dict, x: jax.Array) -> jax.Array:
    """The router's softmax over the heads: x [B, S, d] -> [B, S, H] float32."""
    logits = jnp.einsum("bsd,dh->bsh", x.astype(jnp.float32), router["w"].astype(jnp.float32))
    return jax.nn.softmax(logits, axis=-1)


def head_selection(probs: jax.Array, k: int, selection: str = "token") -> jax.Array:
    """Which heads work for which tokens: probs [B, S, H] -> [B, S, H] bool (module docstring)."""
    if selection not in SELECTIONS:
        raise ValueError(f"head selection {selection!r} must be one of {', '.join(SELECTIONS)}")
    B, S, H = probs.shape
    if not 1 <= k <= H:
        raise ValueError(f"head_top_k={k} must be in [1, {H}] (the heads)")
    if selection == "token":
        _, idx = jax.lax.top_k(probs, k)
        return jnp.any(jax.nn.one_hot(idx, H, dtype=jnp.bool_), axis=-2)
    capacity = min(S, math.ceil(S * k / H))
    _, idx = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)  # [B, H, c] token indices per head
    chosen = jnp.any(jax.nn.one_hot(idx, S, dtype=jnp.bool_), axis=-2)  # [B, H, S]
    return jnp.swapaxes(chosen, 1, 2)


def head_gates(router: dict, x: jax.Array, k: int, selection: str = "token") -> jax.Array:
    """The multiplier of every head's output: x [B, S, d] -> [B, S, H] float32, 1 for the
    selected heads and 0 for the others in the forward pass, with the router probability's
    gradient (straight-through)."""
    p = head_probs(router, x)
    chosen = head_selection(jax.lax.stop_gradient(p), k, selection)
    return jnp.where(chosen, 1.0 + (p - jax.lax.stop_gradient(p)), 0.0)  # exactly 1 forward


def select_heads(params: dict, heads: jax.Array, x: jax.Array, acfg) -> jax.Array:
    """heads [B, S, H, Dv] with each token's unselected heads zeroed; x [B, S, d] is the
    attention's input (the router reads it)."""
    gates = head_gates(params["head_router"], x, acfg.head_top_k, acfg.head_selection)
    return heads * gates[..., None].astype(heads.dtype)
