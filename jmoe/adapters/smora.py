"""SMoRA: each rank of one LoRA is an expert; a token activates a few ranks.

Per adapted projection (`StyxXuan/smora`, `tuners/srmole/layer.py`):
  s = sigmoid(x W_r) + b                       router over the r ranks, b a non-gradient bias
  v, idx = top_k(s, k)                         the gate values keep the bias
  g = scatter(idx, v); g = k * g / sum(g)      normalised over the k selected ranks
  delta = (alpha / k) ((x A) * g) B
No auxiliary loss: after every training step b += u * sign(mean(counts) - counts).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.adapters.base import AdapterAux, dropout, init_lora, lora_a, projection_adapter
from jmoe.options import Options, option
from jmoe.registry import ADAPTERS


@dataclasses.dataclass(frozen=True)
class SMoRAOptions(Options):
    """bias_update_rate: u of the sign update of the rank bias (loss-free balancing)."""

    bias_update_rate: float = option(1e-5, ge=0.0)


def _init(key, d_in, d_out, cfg, dtype):
    k_lora, k_router = jax.random.split(key)
    return {**init_lora(k_lora, d_in, d_out, cfg.rank, dtype), "router": lora_a(k_router, (d_in, cfg.rank), d_in, dtype)}


def rank_gates(scores: jax.Array, bias: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Dense gates [T, r] (k nonzero per row, summing to k) and the selected ranks [T, k]."""
    v, idx = lax.top_k(scores + bias, k)
    v = v / jnp.sum(v, axis=-1, keepdims=True) * k
    g = jnp.sum(jax.nn.one_hot(idx, scores.shape[-1], dtype=v.dtype) * v[..., None], axis=-2)
    return g, idx


def _delta(p, x, cfg, *, state=None, key=None):
    k = cfg.top_k
    xd = dropout(x, cfg.dropout, key)
    scores = jax.nn.sigmoid(xd.astype(jnp.float32) @ p["router"].astype(jnp.float32))
    bias = jnp.zeros((cfg.rank,), jnp.float32) if state is None else state["bias"]
    g, idx = rank_gates(scores, bias, k)
    z = (xd @ p["A"].astype(x.dtype)) * g.astype(x.dtype)
    delta = (cfg.lora_alpha / k) * (z @ p["B"].astype(x.dtype))
    counts = jnp.sum(jax.nn.one_hot(idx, cfg.rank, dtype=jnp.float32), axis=(0, 1))
    zero = jnp.zeros((), jnp.float32)
    return delta, AdapterAux(loss=zero, balance_loss=zero, entropy=zero, experts_per_token=jnp.float32(k),
                             counts={"": counts})


def _init_state(shapes, cfg):
    return {name: {"bias": jnp.zeros((cfg.rank,), jnp.float32)} for name in shapes}


def _update_state(state, counts, cfg):
    u = cfg.options.bias_update_rate
    out = {}
    for name, s in state.items():
        c = counts[name]
        out[name] = {"bias": s["bias"] + u * jnp.sign(jnp.mean(c) - c)}
    return out


def _check(cfg):
    if cfg.top_k > cfg.rank:
        raise ValueError(f"AdapterConfig.top_k={cfg.top_k} (active ranks) must be <= rank={cfg.rank} for smora")


SMORA = ADAPTERS.add("smora", projection_adapter(_init, _delta, init_state=_init_state, update_state=_update_state,
                                                 check=_check, uses=("top_k",)), options=SMoRAOptions)
