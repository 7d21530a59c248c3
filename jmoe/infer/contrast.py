"""Self-contrast decoding of MoE models (SCMoE, "Unchosen Experts Can Contribute Too",
DavidFanzz/SCMoE `decodingmethod/moe_utils.py`).

The same model runs twice per token: with its own top-k routing (the strong activation) and
with a weak routing, every MoE layer keeping only the experts at `ranks` of each token's
ranking (`jmoe.routing.ranks`; rank 0 alone is top-1 routing, the reference's default). Each
keeps its own KV cache. The next token comes from

    z = (1 + beta) * z_strong - beta * z_weak,   z = -inf where z_strong < log(alpha) + max z_strong

(raw logits, the reference's plausibility cutoff on the strong logits). `SamplingParams` then
apply to z: greedy decoding takes its argmax (the reference's `scmoe`), temperature and the
other stages sample from it (`scmoe_with_sampling`). Defaults are the reference's: alpha 0.1,
beta 0.5, ranks (0,).

    engine = Engine(cfg, params, state, contrast=SelfContrast(ranks=(1,)))
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jmoe.options import Options, option
from jmoe.routing.edit import check_index_list


@dataclasses.dataclass(frozen=True)
class SelfContrast(Options):
    """How the weak routing is made and how much it is contrasted."""

    ranks: tuple = option((0,), doc="ranks of each token's experts the weak routing keeps (0 = the top one)")
    alpha: float = option(0.1, gt=0.0, le=1.0, doc="plausibility cutoff: tokens below alpha times the top "
                                                   "strong probability are excluded")
    beta: float = option(0.5, ge=0.0, doc="strength of the contrast; 0 decodes with the strong routing alone")

    @classmethod
    def owner(cls) -> str:
        return "contrast"

    def __post_init__(self):
        super().__post_init__()
        check_index_list("contrast.ranks", self.ranks, noun="rank")

    def weak_config(self, cfg):
        """The model config of the weak routing: every MoE layer routes top max(ranks) + 1 and
        keeps the experts at `ranks`. ValueError for a dense model or too few experts."""
        if not cfg.moe_layers:
            raise ValueError("contrast: the model has no MoE layers to route weakly")
        k = max(self.ranks) + 1
        for i in cfg.moe_layers:
            moe = cfg.moe_for(i)
            if k > moe.num_ffn_choices:
                raise ValueError(f"contrast.ranks={list(self.ranks)}: rank {k - 1} needs {k} experts; MoE layer {i} "
                                 f"has {moe.num_ffn_choices}")
            if moe.routing_edit != "none":
                raise ValueError(f"contrast: MoE layer {i} already edits its routing ({moe.routing_edit!r})")
        return cfg.with_moe(top_k=k, routing_edit="ranks", routing_edit_options={"ranks": list(self.ranks)})

    def combine(self, strong: jax.Array, weak: jax.Array) -> jax.Array:
        """strong, weak: [..., V] logits -> [..., V] float32 contrasted logits."""
        strong, weak = strong.astype(jnp.float32), weak.astype(jnp.float32)
        cutoff = math.log(self.alpha) + jnp.max(strong, axis=-1, keepdims=True)
        return jnp.where(strong < cutoff, -jnp.inf, (1 + self.beta) * strong - self.beta * weak)
