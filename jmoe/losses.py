"""Balance and regularisation losses of routers, routing statistics, and the aux-loss-free
bias update.

All functions are pure and compute in float32. Statistics that span devices take a
`reduce` function (a `psum` over the token axes under `shard_map`, the identity otherwise),
so one definition serves the single-device and the expert-parallel layer.

Balance losses (registry `BALANCE_LOSSES`, chosen by `MoEConfig.balance_loss`; each equals 1
at perfectly uniform routing unless noted):
  switch           C * sum_i f_i P_i, f_i = share of the routed token-slots that chose i
                   (all T*k slots counted), P_i = mean router probability of i.
  switch_topk_any  C * sum_i f_i P_i with f_i = share of tokens that have i among their
                   choices (sums to the mean k; equals k at uniform routing).
  seq_aux          DeepSeek-V3's sequence-wise loss: per sequence, f_i = C/(k S) * count_i
                   and P_i = mean of the per-token normalised scores s_i / sum_j s_j.
  device           DeepSeek-V2's device-level loss over `devices` groups of experts (option):
                   sum_d mean_{i in d}(C f_i) * sum_{i in d} P_i.
  none             0.
`balance_scope` decides whose counts make f: "global" (everything the optimizer step sees:
all shards, all micro-batches), "micro" (each shard / micro-batch alone, then averaged),
"sequence" (each sequence alone). P always comes from the tokens at hand, so the gradient
of a global-scope loss is the Qwen global-batch balance gradient.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp

from jmoe.options import Options, option
from jmoe.registry import BALANCE_LOSSES

if TYPE_CHECKING:
    from jmoe.routing.base import Routing


def expert_counts(expert_ids: jax.Array, mask: jax.Array, num_experts: int) -> jax.Array:
    """Number of selected token-slots per choice.

    Args:
      expert_ids: [T, k] int.
      mask: [T, k] bool, slots that count.
    Returns:
      [E] float32 counts.
    """
    one_hot = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32)
    return jnp.einsum("tke,tk->e", one_hot, mask.astype(jnp.float32))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. logits: [T, E]."""
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(z**2)


def token_entropy(probs: jax.Array) -> jax.Array:
    """[T] entropy (nats) of each token's router distribution. probs: [T, E]."""
    p = probs.astype(jnp.float32)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)


def router_entropy(probs: jax.Array) -> jax.Array:
    """Mean entropy (nats) of the router distribution. probs: [T, E]."""
    return jnp.mean(token_entropy(probs))


def max_violation(load: jax.Array) -> jax.Array:
    """MaxVio = max load / mean load - 1 (0 for perfect balance). load: [E]."""
    mean = jnp.mean(load)
    return jnp.where(mean > 0, jnp.max(load) / jnp.where(mean > 0, mean, 1.0) - 1.0, 0.0)


def update_selection_bias(bias: jax.Array, tokens_per_expert: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing (DeepSeek-V3): b <- b - rate * sign(load - mean load).

    Overloaded experts become less attractive to select, underloaded ones more. Pass counts
    summed over the whole optimizer step (every device, every micro-batch) and every device
    computes the same new bias. bias, tokens_per_expert: [E].
    """
    if jnp.ndim(bias) != 1 or jnp.shape(tokens_per_expert) != jnp.shape(bias):
        raise ValueError(f"bias and tokens_per_expert must both be [E], got shapes {jnp.shape(bias)} and "
                         f"{jnp.shape(tokens_per_expert)}")
    load = tokens_per_expert.astype(jnp.float32)
    return (bias - rate * jnp.sign(load - jnp.mean(load))).astype(bias.dtype)


# ------------------------------------------------------------------------------- balance


@dataclasses.dataclass(frozen=True)
class BalanceContext:
    """Where the routing's tokens sit.

    seq_len: tokens per sequence (the routing's T is a whole number of sequences).
    reduce: sums a statistic over every shard of the batch.
    shards: how many shards `reduce` sums over.
    global_counts: [C] counts of the whole optimizer step, when the caller has them
      (gradient accumulation); they replace the reduced counts of scope "global".
    """

    seq_len: int
    reduce: Callable[[jax.Array], jax.Array] = lambda v: v
    shards: int = 1
    global_counts: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Stats:
    counts: jax.Array  # [C] selected slots per choice
    prob_sum: jax.Array  # [C] sum over tokens of the (normalised) probabilities
    tokens: jax.Array  # scalar


def _stats(expert_ids, mask, probs, C, normalise=False) -> Stats:
    p = probs.astype(jnp.float32)
    if normalise:
        p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-20)
    return Stats(expert_counts(expert_ids, mask, C), jnp.sum(p, axis=0), jnp.float32(p.shape[0]))


@dataclasses.dataclass(frozen=True)
class BalanceLoss:
    """A registry entry: `fn(stats, cfg, eta) -> scalar` over one scope's statistics.

    normalised_probs: P is the mean of the per-token normalised scores s_i / sum_j s_j.
    scope: a scope the loss always uses ("sequence" for seq_aux), or None for
      `MoEConfig.balance_scope`.
    zero: the loss is identically 0 ("none").
    """

    fn: Callable[[Stats, object, jax.Array], jax.Array]
    normalised_probs: bool = False
    scope: str | None = None
    zero: bool = False

    def scope_for(self, cfg) -> str:
        """The scope of this loss in the layer `cfg`."""
        return self.scope or cfg.balance_scope


def needs_step_counts(cfg) -> bool:
    """Whether the layer's balance loss needs the counts of the whole optimizer step (a
    global-scope loss that is not 0): under gradient accumulation they must be known before
    any micro-batch's gradient."""
    entry = BALANCE_LOSSES.get(cfg.balance_loss)
    return entry.scope_for(cfg) == "global" and not entry.zero and cfg.aux_loss_coef > 0


@dataclasses.dataclass(frozen=True)
class DeviceBalanceOptions(Options):
    """devices: groups of contiguous experts (DeepSeek-V2's devices) the loss balances."""

    devices: int = option(1, ge=1)

    def validate(self, cfg) -> None:
        if cfg.num_choices % self.devices:
            raise ValueError(
                f"MoEConfig.device.devices={self.devices} must divide the {cfg.num_choices} router choices"
            )


def _switch(s: Stats, cfg, eta) -> jax.Array:
    C = s.counts.shape[0]
    f = s.counts / jnp.maximum(jnp.sum(s.counts), 1.0)
    return C * jnp.sum(eta * f * s.prob_sum / s.tokens)


def _switch_topk_any(s: Stats, cfg, eta) -> jax.Array:
    C = s.counts.shape[0]
    return C * jnp.sum(eta * (s.counts / s.tokens) * s.prob_sum / s.tokens)


def _device(s: Stats, cfg, eta) -> jax.Array:
    C = s.counts.shape[0]
    D = cfg.balance_options.devices
    f = C * s.counts / jnp.maximum(jnp.sum(s.counts), 1.0)
    P = s.prob_sum / s.tokens
    return jnp.sum(jnp.mean((eta * f).reshape(D, -1), axis=1) * jnp.sum(P.reshape(D, -1), axis=1))


BALANCE_LOSSES.add("switch", BalanceLoss(_switch))
BALANCE_LOSSES.add("switch_topk_any", BalanceLoss(_switch_topk_any))
BALANCE_LOSSES.add("seq_aux", BalanceLoss(_switch, normalised_probs=True, scope="sequence"))
BALANCE_LOSSES.add("device", BalanceLoss(_device), options=DeviceBalanceOptions)
BALANCE_LOSSES.add("none", BalanceLoss(lambda s, cfg, eta: jnp.zeros((), jnp.float32), zero=True))


def balance_loss(routing: Routing, cfg, ctx: BalanceContext, eta=None, count_transform=None) -> jax.Array:
    """The configured balance loss of `routing` (see the module docstring).

    eta: optional [C] per-choice loss weights (MoE++'s tau for FLOP-free experts).
    count_transform: optional counts -> counts (AdaMoE averages the null experts' counts).
    """
    entry = BALANCE_LOSSES.get(cfg.balance_loss)
    fn = entry.fn
    C = routing.num_choices
    eta = jnp.ones((C,), jnp.float32) if eta is None else eta
    tf = count_transform or (lambda c: c)
    normalise = entry.normalised_probs
    scope = entry.scope_for(cfg)
    red = ctx.reduce

    if scope == "global":
        s = _stats(routing.expert_ids, routing.mask, routing.probs, C, normalise)
        counts = ctx.global_counts if ctx.global_counts is not None else red(s.counts)
        s = Stats(tf(counts), red(s.prob_sum), red(s.tokens))
        return fn(s, cfg, eta)
    if scope == "micro":
        s = _stats(routing.expert_ids, routing.mask, routing.probs, C, normalise)
        return red(fn(Stats(tf(s.counts), s.prob_sum, s.tokens), cfg, eta)) / ctx.shards
    # per sequence
    T = routing.num_tokens
    S = ctx.seq_len
    n_seq = T // S
    shape = lambda a: a.reshape((n_seq, S) + a.shape[1:])
    per_seq = jax.vmap(
        lambda ids, m, p: fn(
            (lambda st: Stats(tf(st.counts), st.prob_sum, st.tokens))(_stats(ids, m, p, C, normalise)), cfg, eta
        )
    )(shape(routing.expert_ids), shape(routing.mask), shape(routing.probs))
    return red(jnp.sum(per_seq)) / red(jnp.float32(n_seq))


def switch_balance_loss(routing: Routing) -> jax.Array:
    """The "switch" balance loss over all of `routing`'s tokens (no scopes, no weights)."""
    s = _stats(routing.expert_ids, routing.mask, routing.probs, routing.num_choices)
    return _switch(s, None, jnp.ones((routing.num_choices,), jnp.float32))
