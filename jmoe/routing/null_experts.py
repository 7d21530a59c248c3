"""Null experts (AdaMoE, Zeng et al., 2024): let tokens choose to use fewer experts.

The router scores E true experts and M null experts (choice ids E..E+M-1) in one softmax
and takes the top_k over all E + M. Null experts compute nothing (their output is 0 and
they never reach the dispatch). The weights of the chosen true experts are renormalised
among themselves; a token that picks only null experts gets no expert output. The balance
loss runs over all E + M choices, with the null experts' counts averaged (they are
interchangeable), so the router may spend any share of its slots on nulls while the true
experts stay balanced.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.options import Options, option
from jmoe.registry import ROUTERS
from jmoe.routing.base import Router, Routing
from jmoe.routing.topk import init_linear_router, router_logits


@dataclasses.dataclass(frozen=True)
class NullExpertsOptions(Options):
    """num_null_experts: M, FLOP-free null experts appended to the router's choices."""

    num_null_experts: int = option(0, ge=0)


def null_experts_route(params, x, cfg, *, state=None, key=None, carry=None) -> Routing:
    """x: [T, d] -> Routing over E + M choices; ids >= E are null experts."""
    logits = router_logits(params, x, cfg, key)
    probs = jax.nn.softmax(logits, axis=-1)
    top, ids = lax.top_k(probs, cfg.top_k)
    true = ids < cfg.num_ffn_choices
    w = jnp.where(true, top, 0.0)
    total = jnp.sum(w, axis=-1, keepdims=True)
    w = w / jnp.where(total > 0, total, 1.0)
    return Routing(expert_ids=ids.astype(jnp.int32), weights=w, probs=probs, logits=logits, mask=jnp.ones(ids.shape, bool))


def _average_nulls(counts, cfg):
    E = cfg.num_ffn_choices
    if cfg.router_options.num_null_experts == 0:
        return counts
    return counts.at[E:].set(jnp.mean(counts[E:]))


def _validate(cfg):
    if cfg.top_k > cfg.num_ffn_choices + cfg.router_options.num_null_experts:
        raise ValueError("MoEConfig.top_k exceeds num_experts + null_experts.num_null_experts")


ROUTERS.add(
    "null_experts",
    Router(
        init=lambda key, cfg: init_linear_router(key, cfg, cfg.num_choices),
        apply=null_experts_route,
        num_choices=lambda cfg: cfg.num_ffn_choices + cfg.router_options.num_null_experts,
        balance_counts=_average_nulls,
        validate=_validate,
    ),
    options=NullExpertsOptions,
)
