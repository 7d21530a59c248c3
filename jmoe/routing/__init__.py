"""Pure routers: `(router params, x [T, d], cfg, state, key, carry) -> Routing`, chosen by name.

  topk           softmax top-k (Switch, GShard, Mixtral)
  sigmoid_bias   DeepSeek-V3: sigmoid scores, selection bias, group-limited routing
  grouped_softmax DeepSeek-V2: softmax scores, group-limited greedy selection
  expert_choice  each expert takes its top-C tokens (non-causal)
  top_p          dynamic number of experts per token
  null_experts   AdaMoE: FLOP-free null experts in the softmax
  moepp          MoE++: zero, copy and constant experts, gating residual
  recurrent      RMoE: a GRU carries router state across layers
  thor           THOR: one random expert per layer and forward pass (no router parameters)
  pregate        Read-ME: every layer routes the first MoE layer's input (routing known ahead)

and the routing edits applied after them (`jmoe.routing.edit`): none, ranks, steer.
"""

from jmoe.registry import ROUTERS
from jmoe.routing import (  # noqa: F401  (register)
    edit, ranks, steer, expert_choice, grouped_softmax, moepp, null_experts, pregate, recurrent, sigmoid_bias, thor,
    top_p, topk,
)
from jmoe.routing.base import Router, Routing


def get_router(name: str) -> Router:
    """The registered `Router` called `name` (ValueError listing the known ones otherwise)."""
    return ROUTERS.get(name)


__all__ = ["Router", "Routing", "ROUTERS", "get_router"]
