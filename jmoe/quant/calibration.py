"""Calibration statistics of a model's experts for quantization, from the tokens each expert
actually receives.

For every MoE layer, over calibration batches:
  - frequency [E]: routing slots that select the expert (MC-MoE's activation frequency);
  - weight [E]: the router probability of those slots, summed (MC-MoE's activation weight:
    the softmax probability before top-k renormalisation, `Routing.probs`);
  - h_in [E, d, d], h_hidden [E, f, f]: GPTQ's Hessians x^T x of each expert's inputs over the
    tokens routed to it: the MoE input for `w_gate`/`w_up`, the hidden activation
    act(x W_gate) * (x W_up) for `w_down`;
  - loss [E, B] for candidate widths B: MC-MoE's quantization loss, the Frobenius norm of the
    change in the layer's output when that expert alone is round-to-nearest quantized to that
    width (the router unchanged), summed over batches as in the reference (`wrapper.py`
    `order_quant`). Only the expert's routed tokens change the output, so it is computed from
    the combine weights and the expert's outputs, without rerunning the layer E x B times.

The statistics are of the float model (no layer-by-layer requantization).
"""

from __future__ import annotations

from functools import partial
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.experts import ACTIVATIONS, all_experts, stacked_experts
from jmoe.nn.transformer import LMConfig, lm_apply
from jmoe.quant.qarray import check_bits, quantize_rtn


@partial(jax.jit, static_argnames="cfg")
def _moe_inputs(params, tokens, cfg, router_state):
    _, aux = lm_apply(params, tokens, cfg, state=router_state, keep_moe_inputs=True)
    return [(h.reshape(-1, h.shape[-1]), a.routing.expert_ids, a.routing.weights, a.routing.mask, a.routing.probs)
            for h, a in zip(aux.moe_inputs, aux.moe)]


def _hidden(experts, x, activation):
    """[E, T, f] hidden activations of every expert on every token."""
    act = ACTIVATIONS.get(activation)

    def one(p):
        up = x @ p["w_up"].astype(x.dtype)
        return act.fn(x @ p["w_gate"].astype(x.dtype)) * up if act.gated else act.fn(up)

    return jax.vmap(one)(experts)


@partial(jax.jit, static_argnames=("activation", "num_experts", "hessians"))
def _layer_stats(experts, rounded, x, ids, weights, mask, probs, expert_map, *, activation, num_experts, hessians):
    E = num_experts
    C = expert_map.shape[0]  # the router's FFN choices
    x = x.astype(jnp.float32)
    live = mask & (ids < C)
    slot_prob = jnp.take_along_axis(probs, jnp.clip(ids, 0, probs.shape[-1] - 1), axis=-1)  # [T, k]
    experts_of = expert_map[jnp.clip(ids, 0, C - 1)]  # choices of a merged layer share experts
    one_hot = jax.nn.one_hot(experts_of, E) * live[..., None]  # [T, k, E]
    selected = jnp.minimum(one_hot.sum(1), 1.0)  # [T, E]
    combine = jnp.einsum("tke,tk->te", one_hot, weights.astype(jnp.float32))
    out = {"frequency": one_hot.sum((0, 1)), "weight": jnp.einsum("tke,tk->e", one_hot, slot_prob)}
    if hessians:
        out["h_in"] = jnp.einsum("te,td,tc->edc", selected, x, x)
        h = _hidden(experts, x, activation)
        out["h_hidden"] = jnp.einsum("te,etf,etg->efg", selected, h, h)
    if rounded:
        y = all_experts(experts, x, activation)  # [T, E, d]
        out["loss"] = jnp.stack([
            jnp.sqrt(jnp.sum((combine[..., None] * (all_experts(q, x, activation) - y)) ** 2, axis=(0, 2)))
            for q in rounded], axis=-1)  # [E, B]
    return out


def calibrate(params: dict, cfg: LMConfig, batches: Iterable, *, router_state=None, candidates: Sequence[int] = (),
              group_size: int = 64, hessians: bool = True) -> dict:
    """Statistics of every MoE layer's routed experts over calibration batches ([B, S(+1)] ids).

    candidates: widths for MC-MoE's quantization loss (none: no loss). group_size: of the
    round-to-nearest quantizer that loss uses. hessians: collect GPTQ's Hessians.
    Returns {layer: {"frequency", "weight": [E], "h_in", "h_hidden", "loss": [E, len(candidates)]},
    "tokens": int} as numpy float64/float32 arrays.
    """
    for b in candidates:
        check_bits(b, "candidates")
    layers = [str(i) for i in cfg.moe_layers]
    if not layers:
        raise ValueError("the model has no MoE layers to calibrate")
    experts = {l: stacked_experts(params["layers"][l]["moe"]["experts"]) for l in layers}
    rounded = {l: [jax.tree.map(lambda w, b=b: quantize_rtn(w, b, group_size).dequantize(), experts[l]) for b in candidates]
               for l in layers}
    total: dict[str, dict] = {l: {} for l in layers}
    tokens = 0
    for batch in batches:
        batch = jnp.asarray(np.asarray(batch)[:, : cfg.max_seq_len])
        for l, (x, ids, w, mask, probs) in zip(layers, _moe_inputs(params, batch, cfg, router_state)):
            moe = cfg.moe_for(int(l))
            expert_map = jnp.asarray(moe.expert_map or range(moe.num_experts), jnp.int32)
            stats = _layer_stats(experts[l], rounded[l], x, ids, w, mask, probs, expert_map, activation=moe.activation,
                                 num_experts=moe.num_experts, hessians=hessians)
            for k, v in stats.items():
                v = np.asarray(v, np.float64)
                total[l][k] = total[l][k] + v if k in total[l] else v
        tokens += int(batch.size)
    if tokens == 0:
        raise ValueError("calibration needs at least one batch")
    return {"layers": total, "tokens": tokens, "candidates": tuple(int(b) for b in candidates)}
