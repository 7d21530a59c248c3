"""The `Routing` result every router returns, and the `Router` registry entry."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Routing:
    """Which experts each token goes to, and with what weight.

    Attributes:
      expert_ids: [T, k] int32, the selected choices of each token. Ids below the number of
        FFN experts E are computed by the dispatch; ids >= E are experts that cost no FLOPs
        (null experts, MoE++ zero/copy/constant experts) and are handled by the router.
      weights: [T, k] float32 combine weight of each slot (zero where `mask` is False).
      probs: [T, C] float32 router probabilities (or scores) over all C choices, used by the
        balance losses. C = E plus any FLOP-free experts.
      logits: [T, C] float32 raw router scores (used by the z-loss).
      mask: [T, k] bool, the slots that were selected. Dynamic-k routers (top-p, expert
        choice) leave some False; `k` is then the static upper bound.
      carry: what the router hands to the next MoE layer (MoE++ gating residual, recurrent
        router state), or None.
    """

    expert_ids: jax.Array
    weights: jax.Array
    probs: jax.Array
    logits: jax.Array
    mask: jax.Array
    carry: Any = None

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def num_choices(self) -> int:
        """Number of router choices C (FFN choices plus FLOP-free ones)."""
        return self.probs.shape[-1]

    def ffn_mask(self, num_ffn_choices: int) -> jax.Array:
        """[T, k] slots that go to FFN experts (selected, id < num_ffn_choices)."""
        return self.mask & (self.expert_ids < num_ffn_choices)

    def for_ffn_experts(self, num_ffn_choices: int) -> "Routing":
        """This routing restricted to FFN choices (what a dispatch computes)."""
        m = self.ffn_mask(num_ffn_choices)
        return self.replace(mask=m, weights=jnp.where(m, self.weights, 0.0), expert_ids=jnp.where(m, self.expert_ids, 0))

    def combine_weights(self, num_experts: int | None = None) -> jax.Array:
        """[T, E] dense combine matrix: weight of expert e for token t (0 if not routed)."""
        E = self.num_choices if num_experts is None else num_experts
        one_hot = jax.nn.one_hot(self.expert_ids, E, dtype=jnp.float32)
        w = jnp.where(self.mask, self.weights, 0.0).astype(jnp.float32)
        return jnp.einsum("tke,tk->te", one_hot, w)


def _none(*_args, **_kwargs):
    return None


@dataclasses.dataclass(frozen=True)
class Router:
    """A registry entry: how to create a router's parameters and apply it.

    init(key, cfg) -> params pytree.
    apply(params, x [T, d], cfg, *, state, key, carry) -> Routing.
    num_choices(cfg) -> C, the width of `Routing.probs` (default cfg.num_ffn_choices).
    The router's options (a `jmoe.options.Options` dataclass) are registered with it:
      `ROUTERS.add(name, Router(...), options=MyOptions)`; `cfg.router_options` holds them.
    init_state(cfg) -> explicit non-gradient state (e.g. a selection bias), or None.
    update_state(state, tokens_per_choice [C], cfg) -> new state, applied once per optimizer
      step outside the gradient (None: stateless).
    extra_output(params, x [T, d], routing, cfg) -> [T, d] added to the layer output: the
      contribution of FLOP-free experts (None: there are none).
    balance_weights(cfg) -> [C] per-choice weights of the balance loss, or None.
    balance_counts(counts [C], cfg) -> counts as the balance loss should see them.
    validate(cfg) raises ValueError for configurations the router cannot serve.
    causal: False for routers whose choice for a token depends on later tokens.
    """

    init: Callable[[jax.Array, Any], Any]
    apply: Callable[..., Routing]
    num_choices: Callable[[Any], int] = lambda cfg: cfg.num_ffn_choices
    init_state: Callable[[Any], Any] = _none
    update_state: Callable[..., Any] | None = None
    extra_output: Callable[..., jax.Array] | None = None
    balance_weights: Callable[[Any], Any] = _none
    balance_counts: Callable[[jax.Array, Any], jax.Array] = lambda counts, cfg: counts
    validate: Callable[[Any], None] = _none
    causal: bool = True
