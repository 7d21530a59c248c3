"""Layerwise recurrent router (RMoE, Qiu et al., 2024).

Each MoE layer projects its tokens to h = recurrent_dim, runs a GRU cell whose state is the
previous MoE layer's router state for the same token (zeros at the first layer), and scores
the experts from the new state; selection and weights are then as in softmax top-k
(`renormalize` applies). The state travels to the next layer as the routing carry. RMoE
shares one GRU cell across layers; here each layer owns its cell (same computation, the
cell's parameters are per layer).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.options import Options, option
from jmoe.registry import ROUTERS
from jmoe.routing.base import Router, Routing


@dataclasses.dataclass(frozen=True)
class RecurrentOptions(Options):
    """recurrent_dim: h, the GRU state width. renormalize: as the topk router's."""

    recurrent_dim: int = option(128, ge=1)
    renormalize: bool = option(False)


def init_recurrent_router(key, cfg) -> dict:
    """RMoE router parameters in `cfg.param_dtype`, h = `recurrent_dim`: `w_in: [d, h]`, a GRU cell
    (`w_x`, `w_h`: [h, 3h]; `b_x`, `b_h`: [3h] zeros) and `w_out: [h, E]`."""
    d, h, E = cfg.d_model, cfg.router_options.recurrent_dim, cfg.num_ffn_choices
    k1, k2, k3, k4 = jax.random.split(key, 4)
    n = lambda k, shape, fan: (fan**-0.5 * jax.random.truncated_normal(k, -2, 2, shape)).astype(cfg.param_dtype)
    return {
        "w_in": n(k1, (d, h), d),
        "gru": {
            "w_x": n(k2, (h, 3 * h), h),
            "w_h": n(k3, (h, 3 * h), h),
            "b_x": jnp.zeros((3 * h,), cfg.param_dtype),
            "b_h": jnp.zeros((3 * h,), cfg.param_dtype),
        },
        "w_out": (0.1**0.5 * n(k4, (h, E), h)).astype(cfg.param_dtype),
    }


def gru_cell(p, x, h):
    """Standard GRU: r, z gates; n = tanh(x W_n + r * (h U_n)); h' = (1 - z) n + z h."""
    gx = x @ p["w_x"] + p["b_x"]
    gh = h @ p["w_h"] + p["b_h"]
    xr, xz, xn = jnp.split(gx, 3, axis=-1)
    hr, hz, hn = jnp.split(gh, 3, axis=-1)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def recurrent_route(params, x, cfg, *, state=None, key=None, carry=None) -> Routing:
    """x: [T, d]; carry: [T, h] previous router state (None at the first MoE layer)."""
    p = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    xi = x.astype(jnp.float32) @ p["w_in"]
    h_prev = jnp.zeros_like(xi) if carry is None else carry.astype(jnp.float32)
    h = gru_cell(p["gru"], xi, h_prev)
    logits = h @ p["w_out"]
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = lax.top_k(probs, cfg.top_k)
    if cfg.router_options.renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(expert_ids=ids.astype(jnp.int32), weights=weights, probs=probs, logits=logits,
                   mask=jnp.ones(ids.shape, bool), carry=h)


ROUTERS.add("recurrent", Router(init=init_recurrent_router, apply=recurrent_route), options=RecurrentOptions)
