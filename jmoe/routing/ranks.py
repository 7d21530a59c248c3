"""Rank routing: a token keeps only the experts at chosen ranks of its top-k (SCMoE's weak
routing, DavidFanzz/SCMoE `modeling_mixtral.py`, `routed_tok`).

The router's selected slots are ranked by weight (0 = the largest; ties by slot order). The
slots whose rank is in `ranks` stay selected and are rescaled so that the token's total weight
is unchanged; the reference renormalises the kept ones to sum to one, the same thing for routers
whose weights sum to one (Mixtral's). Ranks below top_k only: a layer routing with rank r needs
top_k > r (`SelfContrast.weak_config` raises the layer's top_k to max(ranks) + 1).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jmoe.options import Options, option
from jmoe.registry import ROUTING_EDITS
from jmoe.routing.base import Routing
from jmoe.routing.edit import check_index_list


@dataclasses.dataclass(frozen=True)
class RanksOptions(Options):
    ranks: tuple = option((0,), doc="ranks of the top-k kept (0 = the top expert)")

    @classmethod
    def owner(cls) -> str:
        return "MoEConfig.ranks"

    def __post_init__(self):
        super().__post_init__()
        check_index_list("MoEConfig.ranks.ranks", self.ranks, noun="rank")

    def validate(self, cfg) -> None:
        if max(self.ranks) >= cfg.top_k:
            raise ValueError(f"MoEConfig.ranks.ranks={list(self.ranks)}: rank {max(self.ranks)} needs "
                             f"top_k >= {max(self.ranks) + 1}, the layer routes top_k={cfg.top_k}")


def keep_ranks(routing: Routing, ranks) -> Routing:
    """routing over [T, k] slots with only the selected slots at the given weight ranks kept."""
    w = jnp.where(routing.mask, routing.weights, -jnp.inf)
    order = jnp.argsort(-w, axis=-1, stable=True)  # slot of each rank
    rank = jnp.argsort(order, axis=-1, stable=True)  # rank of each slot
    keep = routing.mask & jnp.isin(rank, jnp.asarray(ranks, rank.dtype))
    weights = jnp.where(routing.mask, routing.weights, 0.0)
    total, kept = jnp.sum(weights, -1, keepdims=True), jnp.sum(jnp.where(keep, weights, 0.0), -1, keepdims=True)
    scale = jnp.where(kept > 0, total / jnp.where(kept > 0, kept, 1.0), 1.0)
    return routing.replace(mask=keep, weights=jnp.where(keep, weights * scale, 0.0).astype(routing.weights.dtype))


@ROUTING_EDITS.register("ranks", options=RanksOptions)
def ranks_edit(routing: Routing, options: RanksOptions, cfg) -> Routing:
    """The routing edit "ranks": `keep_ranks` with the layer's options."""
    return keep_ranks(routing, options.ranks)
