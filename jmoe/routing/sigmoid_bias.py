"""DeepSeek-V3 routing: sigmoid scores, a selection-only bias, group-limited top-k.

s = sigmoid(x W) in float32. Experts are chosen on s + b, where b is explicit router state
updated outside the gradient (`jmoe.losses.update_selection_bias`: overloaded experts'
bias falls, underloaded ones' rises: aux-loss-free balancing). With expert_groups > 1 the
experts form contiguous groups; a token first keeps its `topk_groups` best groups, scored
by the sum of their two best biased scores, and picks its top_k experts inside them. Gate
weights come from the unbiased s of the chosen experts, normalised to sum to 1 (unless
renormalize=False) and multiplied by route_scale, so they do not depend on b except through
the choice.
"""


from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.losses import update_selection_bias
from jmoe.options import Options, option
from jmoe.registry import ROUTERS
from jmoe.routing.base import Router, Routing
from jmoe.routing.topk import init_linear_router, router_logits


@dataclasses.dataclass(frozen=True)
class GroupLimitedOptions(Options):
    """renormalize: normalise the k gate weights to sum to 1.
    route_scale: multiplier of the (normalised) gate weights.
    expert_groups, topk_groups: experts form `expert_groups` contiguous groups; each token
    keeps its `topk_groups` best groups and picks its top_k experts inside them."""

    renormalize: bool = option(False)
    route_scale: float = option(1.0, gt=0.0)
    expert_groups: int = option(1, ge=1)
    topk_groups: int = option(1, ge=1)

    def validate(self, cfg) -> None:
        E, G, g = cfg.num_ffn_choices, self.expert_groups, self.topk_groups
        name = f"MoEConfig.{cfg.router}"
        if E % G:
            raise ValueError(f"{name}.expert_groups={G} must divide num_experts={E}")
        if g > G:
            raise ValueError(f"{name}.topk_groups={g} must be <= expert_groups={G}")
        if cfg.top_k > g * (E // G):
            raise ValueError(f"MoEConfig.top_k={cfg.top_k} exceeds the {g * (E // G)} experts in topk_groups={g} groups")


@dataclasses.dataclass(frozen=True)
class SigmoidBiasOptions(GroupLimitedOptions):
    """GroupLimitedOptions (renormalize on by default), and bias_update_rate: gamma of the
    aux-loss-free bias update b -= gamma * sign(load - mean load)."""

    renormalize: bool = option(True)
    bias_update_rate: float = option(1e-3, ge=0.0)


def group_limited_scores(scores: jax.Array, num_groups: int, topk_groups: int) -> jax.Array:
    """Scores of experts outside each token's best groups set to -inf.

    scores: [T, E] (biased); groups are contiguous blocks of E / num_groups experts, scored by
    the sum of their two best scores (the best one when groups have a single expert).
    """
    T, E = scores.shape
    if num_groups == 1:
        return scores
    grouped = scores.reshape(T, num_groups, E // num_groups)
    best = lax.top_k(grouped, min(2, E // num_groups))[0]
    group_score = jnp.sum(best, axis=-1)  # [T, G]
    _, keep = lax.top_k(group_score, topk_groups)
    keep_mask = jnp.any(jax.nn.one_hot(keep, num_groups, dtype=bool), axis=1)  # [T, G]
    return jnp.where(keep_mask[:, :, None], grouped, -jnp.inf).reshape(T, E)


def sigmoid_bias_route(params, x, cfg, *, state=None, key=None, carry=None) -> Routing:
    """x: [T, d] -> Routing.

    The selection bias comes from `state["bias"]` (trained aux-loss-free), else from a frozen
    `params["bias"]` (a converted checkpoint's e_score_correction_bias), else 0.
    """
    opts = cfg.router_options
    logits = router_logits(params, x, cfg, key)
    scores = jax.nn.sigmoid(logits)
    if state is not None:
        bias = state["bias"].astype(jnp.float32)
    elif "bias" in params:
        bias = jax.lax.stop_gradient(params["bias"].astype(jnp.float32))
    else:
        bias = 0.0
    choice = group_limited_scores(scores + bias, opts.expert_groups, opts.topk_groups)
    _, ids = lax.top_k(choice, cfg.top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if opts.renormalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    weights = weights * opts.route_scale
    return Routing(expert_ids=ids.astype(jnp.int32), weights=weights, probs=scores, logits=logits,
                   mask=jnp.ones(ids.shape, bool))


ROUTERS.add(
    "sigmoid_bias",
    Router(
        init=init_linear_router,
        apply=sigmoid_bias_route,
        init_state=lambda cfg: {"bias": jnp.zeros((cfg.num_ffn_choices,), jnp.float32)},
        update_state=lambda state, counts, cfg: {
            "bias": update_selection_bias(state["bias"], counts[: cfg.num_ffn_choices], cfg.router_options.bias_update_rate)
        },
    ),
    options=SigmoidBiasOptions,
)
