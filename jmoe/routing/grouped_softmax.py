"""DeepSeek-V2 routing: softmax scores with group-limited greedy selection.

s = softmax(x W) in float32. With expert_groups > 1 each token keeps the `topk_groups`
groups with the highest maximum score, the other groups' scores become 0, and the top_k
experts are taken among the rest. Weights are the chosen scores (renormalised when
`renormalize=True`) times route_scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.registry import ROUTERS
from jmoe.routing.base import Router, Routing
from jmoe.routing.sigmoid_bias import GroupLimitedOptions
from jmoe.routing.topk import init_linear_router, router_logits


def grouped_softmax_route(params, x, cfg, *, state=None, key=None, carry=None) -> Routing:
    """x: [T, d] -> Routing."""
    opts = cfg.router_options
    logits = router_logits(params, x, cfg, key)
    scores = jax.nn.softmax(logits, axis=-1)
    choice = scores
    G = opts.expert_groups
    if G > 1:
        T, E = scores.shape
        grouped = scores.reshape(T, G, E // G)
        _, keep = lax.top_k(jnp.max(grouped, axis=-1), opts.topk_groups)
        keep_mask = jnp.any(jax.nn.one_hot(keep, G, dtype=bool), axis=1)
        choice = jnp.where(keep_mask[:, :, None], grouped, 0.0).reshape(T, E)
    weights, ids = lax.top_k(choice, cfg.top_k)
    if opts.renormalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    weights = weights * opts.route_scale
    return Routing(expert_ids=ids.astype(jnp.int32), weights=weights, probs=scores, logits=logits,
                   mask=jnp.ones(ids.shape, bool))


ROUTERS.add("grouped_softmax", Router(init=init_linear_router, apply=grouped_softmax_route), options=GroupLimitedOptions)
