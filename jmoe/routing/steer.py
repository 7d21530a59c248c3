"""Expert steering (RICE, "Two Experts Are All You Need for Steering Thinking"): a layer's
chosen experts get their routing weight multiplied by `factor` wherever the router selects them.

Only slots the router already selected change (the selection itself is the router's); with
`renormalize` (the default) the token's weights are then rescaled to their total before the
edit, so the steered experts take a larger share of an output of the usual size; without it
their outputs are simply amplified. The paper reinforces the two experts found by
`jmoe.editing.steer.expert_npmi`; its text does not say whether the weights are renormalised
afterwards, so both are offered. `steer_config` puts the edit on the layers named.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp

from jmoe.options import Options, option
from jmoe.registry import ROUTING_EDITS
from jmoe.routing.base import Routing
from jmoe.routing.edit import check_index_list


@dataclasses.dataclass(frozen=True)
class SteerOptions(Options):
    experts: tuple = option((), doc="the layer's experts to reinforce")
    factor: float = option(64.0, gt=0.0, doc="multiplies their routing weight where selected")
    renormalize: bool = option(True, doc="rescale the token's weights to their total before the edit")

    @classmethod
    def owner(cls) -> str:
        return "MoEConfig.steer"

    def __post_init__(self):
        super().__post_init__()
        check_index_list("MoEConfig.steer.experts", self.experts, noun="expert", kind="expert indices", unique=False)

    def validate(self, cfg) -> None:
        if max(self.experts) >= cfg.num_ffn_choices:
            raise ValueError(f"MoEConfig.steer.experts={list(self.experts)}: expert {max(self.experts)} is outside the "
                             f"layer's {cfg.num_ffn_choices} experts")


def steer_weights(routing: Routing, experts, factor: float, renormalize: bool = True) -> Routing:
    """routing over [T, k] slots with the weights of the selected slots of `experts` times factor."""
    hit = routing.mask & jnp.isin(routing.expert_ids, jnp.asarray(experts, routing.expert_ids.dtype))
    w = jnp.where(routing.mask, routing.weights, 0.0)
    steered = jnp.where(hit, w * factor, w)
    if renormalize:
        total, new = jnp.sum(w, -1, keepdims=True), jnp.sum(steered, -1, keepdims=True)
        steered = steered * jnp.where(new > 0, total / jnp.where(new > 0, new, 1.0), 1.0)
    return routing.replace(weights=steered.astype(routing.weights.dtype))


@ROUTING_EDITS.register("steer", options=SteerOptions)
def steer_edit(routing: Routing, options: SteerOptions, cfg) -> Routing:
    """The routing edit "steer": `steer_weights` with the layer's options."""
    return steer_weights(routing, options.experts, options.factor, options.renormalize)


def steer_config(cfg, pairs: Sequence[tuple[int, int]], factor: float = 64.0, renormalize: bool = True):
    """The `LMConfig` with expert steering on the (model layer, expert) pairs named. ValueError
    for a layer that is not an MoE layer, an expert it lacks, or a layer that already edits its
    routing."""
    if not pairs:
        raise ValueError("steer: name at least one (layer, expert) pair")
    by_layer: dict[int, list[int]] = {}
    for layer, expert in pairs:
        if layer not in cfg.moe_layers:
            raise ValueError(f"steer: layer {layer} is not an MoE layer (MoE layers: "
                             f"{', '.join(map(str, cfg.moe_layers)) or 'none'})")
        by_layer.setdefault(int(layer), []).append(int(expert))
    overrides = dict(cfg.layer_moe)
    for layer, experts in by_layer.items():
        moe = cfg.moe_for(layer)
        if moe.routing_edit != "none":
            raise ValueError(f"steer: MoE layer {layer} already edits its routing ({moe.routing_edit!r})")
        try:
            overrides[layer] = moe.replace(routing_edit="steer", routing_edit_options={
                "experts": sorted(set(experts)), "factor": factor, "renormalize": renormalize})
        except ValueError as e:
            raise ValueError(f"steer: layer {layer}: {e}") from None
    return cfg.replace(layer_moe=overrides)
