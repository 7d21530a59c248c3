"""Gather dispatch for decoding: each token-slot runs its own expert's weights.

A decoding step routes a few tokens (T*k token-slots, often fewer than the E experts).
The dropless loop walks every expert and computes chunks of rows; here a loop over the
T*k slots instead reads slot s's expert weights `w[expert_ids[s]]` and multiplies them by
its token (a matrix-vector product), then the k results of each token are combined with
the routing weights. It reads T*k experts' weights and nothing of the others; two tokens
that share an expert read it twice. Reading each distinct expert once and running it on
all T tokens was not consistently faster where `decode_dispatch` picks gather, and
gathering the T*k experts' weights into one `[T*k, d, f]` array for a batched product was
slower (it copies them first); both are measured beside this one in
experiments/bench_decode_dispatch.py.

Each slot still pays for a copy: XLA:CPU copies `w[e]` out of the stacked `[E, d, f]`
array before the matmul, whether e is dynamic or a static index in a `lax.switch` branch.
Picking among E separate arrays with `lax.switch` instead took 0.53x the time per MoE
layer for E=8, d_ff=1152 (1 and 8 tokens) and 0.67-0.73x for E=64, d_ff=160
(experiments/bench_decode_moe.py, "layout"). That is the `jmoe.experts.ExpertList` layout,
which the inference engine serves with on CPU through the dropless loop; this dispatch is
for stacked experts (given a list, the layer stacks it).

Choosing between this and "dropless" for a static step shape: `decode_dispatch`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.checks import is_int
from jmoe.dispatch.base import expert_fn_for
from jmoe.registry import DISPATCHERS

if TYPE_CHECKING:
    from jmoe.config import MoEConfig
    from jmoe.routing.base import Routing

GATHER_MAX_SLOTS_PER_EXPERT = 0.5
"""`decode_dispatch` gathers while T*k <= this * E (measured, see `decode_dispatch`)."""


def _check_shapes(expert_params, x, routing) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be [T, d], got shape {tuple(x.shape)}")
    ids = routing.expert_ids
    if ids.ndim != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"routing.expert_ids must be [T, k] with T={x.shape[0]}, got shape {tuple(ids.shape)}")
    w_up = expert_params["w_up"]
    if w_up.ndim != 3 or w_up.shape[1] != x.shape[1]:
        raise ValueError(f"expert_params['w_up'] must be [E, d, f] with d={x.shape[1]}, got shape {tuple(w_up.shape)}")


def _slot_outputs(expert_params, x, expert_ids, mask, cfg):
    """Each used slot's expert on its token; unused slots give 0.

    expert_ids, mask: [T, k] -> [T*k, d] in the compute dtype (slot s is token s // k).
    """
    T, k = expert_ids.shape
    expert_fn = expert_fn_for(cfg)

    def run(e, t):
        params = jax.tree.map(lambda w: lax.dynamic_index_in_dim(w, e, keepdims=False), expert_params)
        return expert_fn(params, lax.dynamic_slice_in_dim(x, t, 1))[0]

    out = jax.eval_shape(run, jnp.int32(0), jnp.int32(0))

    # The backward recomputes each slot's forward instead of storing its expert's weights.
    @jax.checkpoint
    def slot(args):
        e, t, used = args
        return lax.cond(used, run, lambda e, t: jnp.zeros(out.shape, out.dtype), e, t)

    tokens = jnp.arange(T * k, dtype=jnp.int32) // k
    return lax.map(slot, (expert_ids.reshape(-1).astype(jnp.int32), tokens, mask.reshape(-1)))


def gather_dispatch(expert_params: dict, x: jax.Array, routing: Routing, cfg: MoEConfig) -> tuple[jax.Array, jax.Array]:
    """y[t] = sum_j w[t, j] * expert_{e_tj}(x[t]), one token-slot at a time.

    Slots whose routing mask is False are skipped (no weights read) and contribute 0.
    Meant for inference steps: the gradient is exact, but its loop adds each slot's weight
    gradient into arrays of the full `[E, ...]` size.

    Args:
      expert_params: `w_up [E, d, f]`, `w_down [E, f, d]` and, for gated activations,
        `w_gate [E, d, f]`.
      x: [T, d].
      routing: `Routing` with `expert_ids`, `weights`, `mask`: [T, k].
      cfg: the `MoEConfig` (its `activation` and compute `dtype`).
    Returns:
      y: [T, d] in the compute dtype (combined in float32); dropped: float32 scalar 0.
    """
    _check_shapes(expert_params, x, routing)
    T, k = routing.expert_ids.shape
    ys = _slot_outputs(expert_params, x, routing.expert_ids, routing.mask, cfg)
    w = jnp.where(routing.mask, routing.weights, 0.0).astype(jnp.float32)
    y = jnp.einsum("tk,tkd->td", w, ys.reshape(T, k, -1).astype(jnp.float32))
    return y.astype(ys.dtype), jnp.zeros((), jnp.float32)


def decode_dispatch(num_tokens: int, top_k: int, num_experts: int) -> str:
    """The dispatch for one MoE layer call of T tokens: "gather" or "dropless".

    "gather" while the step's token-slots are few against the experts,
    T*k <= GATHER_MAX_SLOTS_PER_EXPERT * E (= E / 2), else "dropless" (which the inference
    engine runs with small chunks, `jmoe.infer.forward.serving_block_size`).

    Measured by experiments/bench_decode_dispatch.py (XLA:CPU, 2 cores, jax 0.10.2, jitted
    forward dispatch, d_model 512, uniform random routing, median of 15 interleaved rounds;
    ms, gather vs dropless at the engine's block size):

        E=8,  k=2, d_ff=1024:  T=1 (T*k=E/4):    2.76 vs 2.34    T=4 (T*k=E):    6.99 vs 6.57
                               T=8 (T*k=2E):    11.79 vs 6.33
        E=64, k=2, d_ff=256:   T=8 (T*k=E/4):    3.82 vs 4.42    T=16 (E/2):     7.32 vs 7.06
                               T=32 (T*k=E):    14.11 vs 11.67
        E=64, k=6, d_ff=256:   T=2 (T*k=0.19E):  3.53 vs 4.70    T=4 (0.38E):    6.50 vs 8.29
                               T=8 (T*k=0.75E): 12.20 vs 13.92   T=16 (1.5E):   22.03 vs 18.36

    Gather's time grows with T*k (one expert's weights read per slot), dropless's with the
    number of experts that have slots. Neither wins everywhere: gather is up to 1.3x faster
    for fine-grained experts at a few tokens, dropless up to 1.2x faster for 8 experts. The
    threshold E / 2 keeps the choice within 1.21x of the faster one at every measured shape
    (E, 2E or never gathering give 1.21x, 1.21x and 1.33x). Not measured on GPU/TPU, where
    dropless runs the Pallas grouped matmul.

    The table above predates the 1-, 2- and 4-row chunks of small blocks
    (`jmoe.dispatch.chunked.chunk_sizes`). With them, experiments/bench_decode_moe.py
    measured gather at 1.01-1.25x dropless's time where it is picked (T*k <= E/2; E=8, k=2,
    d_ff=1152 and E=64, k=6, d_ff=160) and 1.12-1.45x above; an earlier run of the same
    comparison had gather at 0.93-0.97x at one token. The threshold is kept until a quieter
    machine settles whether gather still pays at all.

    Args:
      num_tokens: T, tokens in the step (batch size for one decoded token per sequence).
      top_k: k, slots per token.
      num_experts: E, routed FFN experts.
    Returns:
      "gather" or "dropless" (names in `jmoe.registry.DISPATCHERS`).
    """
    for name, value in (("num_tokens", num_tokens), ("top_k", top_k), ("num_experts", num_experts)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_tokens * top_k <= GATHER_MAX_SLOTS_PER_EXPERT * num_experts:
        return "gather"
    return "dropless"


DISPATCHERS.add("gather", gather_dispatch)
