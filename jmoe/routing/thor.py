"""THOR, stochastic experts ("Taming Sparsely Activated Transformer with Stochastic Experts",
microsoft/Stochastic-Mixture-of-Experts `thor/transformer_thor_layer.py`): no router at all.

In training (a `key` is passed to the layer) each MoE layer draws one expert uniformly at random
per forward pass, and every token of the batch goes to it with weight 1 (the reference's
`torch.randint(size=(1,))` per layer call). Without a key (evaluation, decoding) every token
goes to `expert` (0 by default): one expert, which the consistency regulariser trains to agree
with the others (`TrainConfig.consistency_weight`, the reference's `consistency_alpha`: both
passes' cross-entropies plus weight x their symmetric KL). The reference's inference draws a
random expert per token or per sentence; decoding here is deterministic, so it keeps one
(`inference="one"`), or takes the ensemble (`inference="ensemble"`): every token goes to every
expert with weight 1/E, so each layer outputs the mean of its experts, the expectation of the
random choice (E times the expert compute). top_k must be 1; the router has no parameters, so
its balance and z losses are constants.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe.options import Options, option
from jmoe.registry import ROUTERS
from jmoe.routing.base import Router, Routing


@dataclasses.dataclass(frozen=True)
class ThorOptions(Options):
    expert: int = option(0, ge=0, doc="the expert every token uses without a key (evaluation, decoding)")
    inference: str = option("one", choices=("one", "ensemble"),
                            doc="without a key: one expert (`expert`), or the mean of every expert")

    def validate(self, cfg) -> None:
        if cfg.top_k != 1:
            raise ValueError(f"MoEConfig.top_k={cfg.top_k}: router 'thor' sends each token to one expert (top_k=1)")
        if self.expert >= cfg.num_ffn_choices:
            raise ValueError(f"MoEConfig.thor.expert={self.expert} is outside the layer's {cfg.num_ffn_choices} experts")


def thor_route(params: dict, x: jax.Array, cfg, *, state=None, key=None, carry=None) -> Routing:
    """x: [T, d] -> Routing [T, 1]: one expert for all tokens, random with a key; without a key
    and with inference="ensemble", Routing [T, E]: every expert, weight 1/E."""
    T, E = x.shape[0], cfg.num_ffn_choices
    if key is None and cfg.router_options.inference == "ensemble":
        return Routing(expert_ids=jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (T, E)),
                       weights=jnp.full((T, E), 1.0 / E, jnp.float32), probs=jnp.full((T, E), 1.0 / E, jnp.float32),
                       logits=jnp.zeros((T, E), jnp.float32), mask=jnp.ones((T, E), bool))
    expert = cfg.router_options.expert if key is None else jax.random.randint(key, (), 0, E)
    ids = jnp.full((T, 1), expert, jnp.int32)
    return Routing(expert_ids=ids, weights=jnp.ones((T, 1), jnp.float32),
                   probs=jnp.full((T, E), 1.0 / E, jnp.float32), logits=jnp.zeros((T, E), jnp.float32),
                   mask=jnp.ones((T, 1), bool))


ROUTERS.add("thor", Router(init=lambda key, cfg: {}, apply=thor_route), options=ThorOptions)
