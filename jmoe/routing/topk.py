"""Softmax top-k routing (Switch k=1, GShard k=2, Mixtral's softmax-after-top-k)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.options import Options, option
from jmoe.registry import ROUTERS
from jmoe.routing.base import Router, Routing


@dataclasses.dataclass(frozen=True)
class TopKOptions(Options):
    """renormalize: rescale the k selected softmax probabilities to sum to 1.
    softmax_after_topk: Mixtral style, select on the logits then softmax over the k selected
    logits (equal to softmax + top-k + renormalize)."""

    renormalize: bool = option(False)
    softmax_after_topk: bool = option(False)


def init_linear_router(key: jax.Array, cfg, num_choices: int | None = None) -> dict:
    """Router weight `w: [d, C]` (C = num_choices, default E), truncated normal with
    variance 0.1 / d (Switch init)."""
    C = cfg.num_ffn_choices if num_choices is None else num_choices
    std = (0.1 / cfg.d_model) ** 0.5
    w = std * jax.random.truncated_normal(key, -2.0, 2.0, (cfg.d_model, C))
    return {"w": w.astype(cfg.param_dtype)}


def router_logits(params: dict, x: jax.Array, cfg, key: jax.Array | None) -> jax.Array:
    """`x: [T, d]` -> logits `[T, E]` in float32, with Switch input jitter when `key` is given."""
    x = x.astype(jnp.float32)
    if cfg.router_jitter > 0 and key is not None:
        eps = cfg.router_jitter
        x = x * jax.random.uniform(key, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    return jnp.dot(x, params["w"].astype(jnp.float32), precision=lax.Precision.HIGHEST)


def topk_route(params: dict, x: jax.Array, cfg, *, state=None, key=None, carry=None) -> Routing:
    """Softmax top-k routing.

    Args:
      params: {"w": [d, E]}.
      x: [T, d] tokens.
    Returns:
      Routing with `expert_ids [T, k]`, `weights [T, k]`: the top-k softmax probabilities
      (renormalised to sum to 1 with the `renormalize` option), or with `softmax_after_topk`
      the softmax over the k selected logits. Ties go to the lower expert index.
    """
    opts = cfg.router_options
    logits = router_logits(params, x, cfg, key)
    probs = jax.nn.softmax(logits, axis=-1)
    if opts.softmax_after_topk:
        top_logits, ids = lax.top_k(logits, cfg.top_k)
        weights = jax.nn.softmax(top_logits, axis=-1)
    else:
        weights, ids = lax.top_k(probs, cfg.top_k)
        if opts.renormalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(
        expert_ids=ids.astype(jnp.int32),
        weights=weights,
        probs=probs,
        logits=logits,
        mask=jnp.ones(ids.shape, bool),
    )


ROUTERS.add("topk", Router(init=init_linear_router, apply=topk_route), options=TopKOptions)
