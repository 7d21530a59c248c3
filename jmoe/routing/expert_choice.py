"""Expert-choice routing (Zhou et al., 2022): each expert takes its top-C tokens.

probs = softmax over experts of x W (per token); expert e keeps the C = ceil(T * k / E)
tokens with the largest probs[:, e] (ties: lower token index), so every expert is exactly
full and a token gets between 0 and E experts (k experts on average). The combine weight is
the token's probability for that expert.

Non-causal: whether a token gets an expert depends on every other token in the batch,
later ones included, so in a decoder it leaks the future. `LMConfig` refuses it unless
`MoEConfig.allow_noncausal=True`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.registry import ROUTERS
from jmoe.routing.base import Router, Routing
from jmoe.routing.topk import init_linear_router, router_logits


def expert_choice_capacity(num_tokens: int, top_k: int, num_experts: int) -> int:
    """Tokens per expert C = ceil(num_tokens * top_k / num_experts), clamped to [1, num_tokens]."""
    return max(1, min(num_tokens, math.ceil(num_tokens * top_k / num_experts)))


def expert_choice_route(params, x, cfg, *, state=None, key=None, carry=None) -> Routing:
    """x: [T, d] -> Routing with k = E slots per token (slot e is expert e, masked if not chosen)."""
    T = x.shape[0]
    E = cfg.num_ffn_choices
    logits = router_logits(params, x, cfg, key)
    probs = jax.nn.softmax(logits, axis=-1)
    C = expert_choice_capacity(T, cfg.top_k, E)
    _, tokens = lax.top_k(probs.T, C)  # [E, C]
    chosen = jnp.zeros((E, T), bool).at[jnp.arange(E)[:, None], tokens].set(True).T  # [T, E]
    ids = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (T, E))
    return Routing(expert_ids=ids, weights=jnp.where(chosen, probs, 0.0), probs=probs, logits=logits, mask=chosen)


ROUTERS.add("expert_choice", Router(init=init_linear_router, apply=expert_choice_route, causal=False))
