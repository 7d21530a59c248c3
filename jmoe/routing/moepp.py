"""MoE++ (Jin et al., 2024): zero-computation experts and the gating residual.

The router scores E FFN experts and Z zero, P copy and Q constant experts, in that id
order (FFN ids 0..E-1, then zero, copy, constant). Tokens routed to the last three never
reach the grouped matmul:
  zero      outputs 0 (the token simply uses fewer experts);
  copy      outputs x;
  constant  outputs a1 x + a2 v with [a1, a2] = softmax(W_c x) and a learned vector v.
Gate weights: softmax, top_k, the zero experts' weights set to 0, then renormalised over the
slots (as the reference code does). With `gating_residual` the logits of layer l are
x W_l + G_l logits_{l-1} (G_l: [C, C], initialised to 0), the previous logits arriving as
the routing carry. The balance loss weights the FLOP-free experts by
`zero_compute_loss_weight` (tau = 0.75).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.options import Options, option
from jmoe.registry import ROUTERS
from jmoe.routing.base import Router, Routing
from jmoe.routing.topk import init_linear_router, router_logits


@dataclasses.dataclass(frozen=True)
class MoEPPOptions(Options):
    """num_zero_experts, num_copy_experts, num_constant_experts: Z, P, Q FLOP-free experts.
    gating_residual: add G_l logits_{l-1} to the router logits. zero_compute_loss_weight:
    tau, the balance-loss weight of the FLOP-free experts."""

    num_zero_experts: int = option(0, ge=0)
    num_copy_experts: int = option(0, ge=0)
    num_constant_experts: int = option(0, ge=0)
    gating_residual: bool = option(False)
    zero_compute_loss_weight: float = option(0.75, ge=0.0)


def num_choices(cfg) -> int:
    """Number of router choices C = E + Z + P + Q (FFN, zero, copy and constant experts)."""
    o = cfg.router_options
    return cfg.num_ffn_choices + o.num_zero_experts + o.num_copy_experts + o.num_constant_experts


def init_moepp_router(key, cfg) -> dict:
    """MoE++ router parameters in `cfg.param_dtype`: `w: [d, C]`; `gate_map: [C, C]` (zeros) with
    `gating_residual`; `const_w: [Q, d, 2]` and `const_v: [Q, d]` for Q constant experts."""
    k_w, k_c, k_v = jax.random.split(key, 3)
    C = num_choices(cfg)
    params = init_linear_router(k_w, cfg, C)
    if cfg.router_options.gating_residual:
        params["gate_map"] = jnp.zeros((C, C), cfg.param_dtype)
    Q = cfg.router_options.num_constant_experts
    if Q:
        d = cfg.d_model
        params["const_w"] = (d**-0.5 * jax.random.truncated_normal(k_c, -2, 2, (Q, d, 2))).astype(cfg.param_dtype)
        params["const_v"] = jax.random.normal(k_v, (Q, d)).astype(cfg.param_dtype)
    return params


def moepp_route(params, x, cfg, *, state=None, key=None, carry=None) -> Routing:
    """x: [T, d] -> Routing over C = E + Z + P + Q choices; carry: previous layer's logits [T, C]."""
    o = cfg.router_options
    logits = router_logits(params, x, cfg, key)
    if o.gating_residual and carry is not None:
        logits = logits + carry.astype(jnp.float32) @ params["gate_map"].astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top, ids = lax.top_k(probs, cfg.top_k)
    E, Z = cfg.num_ffn_choices, o.num_zero_experts
    zero = (ids >= E) & (ids < E + Z)
    w = jnp.where(zero, 0.0, top)
    total = jnp.sum(w, axis=-1, keepdims=True)
    w = w / jnp.where(total > 0, total, 1.0)
    return Routing(expert_ids=ids.astype(jnp.int32), weights=w, probs=probs, logits=logits,
                   mask=jnp.ones(ids.shape, bool), carry=logits if o.gating_residual else None)


def moepp_extra_output(params, x, routing, cfg) -> jax.Array:
    """The copy and constant experts' contribution. x: [T, d] -> [T, d]."""
    o = cfg.router_options
    E, Z, P, Q = cfg.num_ffn_choices, o.num_zero_experts, o.num_copy_experts, o.num_constant_experts
    ids, w = routing.expert_ids, jnp.where(routing.mask, routing.weights, 0.0)
    x32 = x.astype(jnp.float32)
    copy_w = jnp.sum(jnp.where((ids >= E + Z) & (ids < E + Z + P), w, 0.0), axis=-1)
    y = copy_w[:, None] * x32
    for c in range(Q):
        wc = jnp.sum(jnp.where(ids == E + Z + P + c, w, 0.0), axis=-1)
        a = jax.nn.softmax(x32 @ params["const_w"][c].astype(jnp.float32), axis=-1)
        y = y + wc[:, None] * (a[:, :1] * x32 + a[:, 1:] * params["const_v"][c].astype(jnp.float32))
    return y


def _validate(cfg):
    if cfg.top_k > num_choices(cfg):
        raise ValueError("MoEConfig.top_k exceeds the number of router choices")


ROUTERS.add(
    "moepp",
    Router(
        init=init_moepp_router,
        apply=moepp_route,
        num_choices=num_choices,
        extra_output=moepp_extra_output,
        balance_weights=lambda cfg: jnp.concatenate([
            jnp.ones((cfg.num_ffn_choices,), jnp.float32),
            jnp.full((num_choices(cfg) - cfg.num_ffn_choices,), cfg.router_options.zero_compute_loss_weight, jnp.float32),
        ]),
        validate=_validate,
    ),
    options=MoEPPOptions,
)
