"""Top-p dynamic routing ("Harder Tasks Need More Experts", Huang et al., 2024).

probs = softmax(x W). Experts are taken in decreasing probability until their cumulative
probability exceeds the `threshold` option p: a sorted expert is kept when the probability of the experts
before it is <= p, so the one that crosses the threshold is kept too. `top_k` is the
static upper bound (set it to E for no bound). Weights are the raw probabilities (not
renormalised). Pair it with `entropy_loss_coef` (the paper's dynamic loss, 1e-4) to sharpen
the router so that easy tokens need fewer experts.
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
class TopPOptions(Options):
    """threshold: p, the cumulative probability the kept experts must exceed."""

    threshold: float = option(0.4, gt=0.0, le=1.0)


def top_p_route(params, x, cfg, *, state=None, key=None, carry=None) -> Routing:
    """x: [T, d] -> Routing whose mask keeps 1..top_k experts per token."""
    logits = router_logits(params, x, cfg, key)
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_probs, ids = lax.top_k(probs, cfg.top_k)
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep = before <= cfg.router_options.threshold
    return Routing(expert_ids=ids.astype(jnp.int32), weights=jnp.where(keep, sorted_probs, 0.0), probs=probs,
                   logits=logits, mask=keep)


ROUTERS.add("top_p", Router(init=init_linear_router, apply=top_p_route), options=TopPOptions)
