"""Routing edits: a change applied to every routing a layer's router makes, at inference.

A routing edit is `edit(routing, options, cfg) -> Routing`, registered by name in
`jmoe.registry.ROUTING_EDITS` with its options (`MoEConfig.routing_edit`,
`MoEConfig.routing_edit_options`); `jmoe.layer.route` applies it after online expert skipping.
It changes which slots are selected (`Routing.mask`) and their weights, never the router's
probabilities, so balance statistics still describe the router itself.

  none    the routing as the router made it (the default)
  ranks   only the experts at chosen ranks of the token's top-k (self-contrast decoding's
          weak routing, `jmoe.routing.ranks`)
  steer   chosen experts' weights multiplied where selected (RICE, `jmoe.routing.steer`)
"""

from __future__ import annotations

from jmoe.registry import ROUTING_EDITS
from jmoe.routing.base import Routing


@ROUTING_EDITS.register("none")
def no_edit(routing: Routing, options, cfg) -> Routing:
    """The routing unchanged."""
    return routing


def check_index_list(field: str, values, *, noun: str, kind: str = "integers", unique: bool = True) -> None:
    """ValueError naming `field` unless `values` is a non-empty list of integers >= 0 (without
    repeats when `unique`): the ranks or experts an edit option names."""
    if not values:
        raise ValueError(f"{field} must name at least one {noun}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"{field}={list(values)} must be {kind} >= 0")
    if unique and len(set(values)) != len(values):
        raise ValueError(f"{field}={list(values)} names a {noun} twice")


def apply_edit(routing: Routing, cfg) -> Routing:
    """`routing` after the layer's routing edit (cfg: its `MoEConfig`)."""
    return ROUTING_EDITS.get(cfg.routing_edit)(routing, cfg.routing_edit_options, cfg)
