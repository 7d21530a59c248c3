"""DynMoLE: LoRA experts per projection with hybrid routing driven by the router's Tsallis
entropy (`mikecovlee/DynMoLE`, `moe_peft/adapters/dynmole/model.py`).

Per adapted projection, with p = softmax(x W_r) over E experts:
  keep the experts of the top-p prefix (cumulative probability <= top_p), at least top_k;
  a token whose normalised Tsallis entropy exceeds the threshold keeps every expert (soft
  routing); weights w = p * keep, not renormalised;
  delta = sum_e w_e (alpha / r) x A_e B_e.
Auxiliary loss: entropy_loss_coef * mean entropy + aux_loss_coef * E * sum_e f_e P_e with
f the mean kept weight and P the mean probability of each expert.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe.adapters.base import AdapterAux, dropout, init_lora, lora_a, projection_adapter
from jmoe.options import Options, option
from jmoe.registry import ADAPTERS


@dataclasses.dataclass(frozen=True)
class DynMoLEOptions(Options):
    """entropy_q: the Tsallis index q (1: Shannon). entropy_threshold: normalised entropy
    above which a token uses every expert (>= 1: never). top_p: the probability mass the
    kept experts cover. entropy_loss_coef, aux_loss_coef: the weights of the mean entropy
    and of the balance loss. eps: added to the probabilities in the entropy."""

    entropy_q: float = option(1.1, gt=0.0, le=2.0)
    entropy_threshold: float = option(0.9, ge=0.0)
    top_p: float = option(0.75, gt=0.0, le=1.0)
    entropy_loss_coef: float = option(0.01, ge=0.0)
    aux_loss_coef: float = option(0.001, ge=0.0)
    eps: float = option(1e-5, ge=0.0)


def tsallis_entropy(p: jax.Array, q: float, eps: float = 1e-5) -> jax.Array:
    """Tsallis entropy of each row of p [..., N], divided by its maximum (uniform p): in [0, 1]."""
    n = p.shape[-1]
    p = p + eps
    if q == 1.0:
        return -jnp.sum(p * jnp.log(p), axis=-1) / jnp.log(n)
    s = (1.0 - jnp.sum(p**q, axis=-1)) / (q - 1.0)
    return s / ((1.0 - n ** (1.0 - q)) / (q - 1.0))


def dynamic_mask(p: jax.Array, cfg) -> tuple[jax.Array, jax.Array]:
    """(keep [T, E] bool, normalised entropy [T]) of router probabilities p [T, E]."""
    opts = cfg.options
    order = jnp.argsort(-p, axis=-1, stable=True)
    sp = jnp.take_along_axis(p, order, axis=-1)
    keep_sorted = (jnp.cumsum(sp, axis=-1) <= opts.top_p) | (jnp.arange(p.shape[-1]) < cfg.top_k)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(p.shape[0])[:, None], order].set(keep_sorted)
    entropy = tsallis_entropy(p, opts.entropy_q, opts.eps)
    if opts.entropy_threshold < 1.0:
        keep = keep | (entropy > opts.entropy_threshold)[:, None]
    return keep, entropy


def _init(key, d_in, d_out, cfg, dtype):
    k_lora, k_router = jax.random.split(key)
    return {**init_lora(k_lora, d_in, d_out, cfg.rank, dtype, experts=cfg.num_experts),
            "router": lora_a(k_router, (d_in, cfg.num_experts), d_in, dtype)}


def _delta(p, x, cfg, *, state=None, key=None):
    opts = cfg.options
    E = cfg.num_experts
    probs = jax.nn.softmax(x.astype(jnp.float32) @ p["router"].astype(jnp.float32), axis=-1)
    keep, entropy = dynamic_mask(probs, cfg)
    w = probs * keep
    xd = dropout(x, cfg.dropout, key)
    z = jnp.einsum("td,edr->ter", xd, p["A"].astype(x.dtype))
    delta = cfg.scaling * jnp.einsum("ter,te,ero->to", z, w.astype(x.dtype), p["B"].astype(x.dtype))
    balance = E * jnp.sum(jnp.mean(w, axis=0) * jnp.mean(probs, axis=0))
    ent = jnp.mean(entropy)
    return delta, AdapterAux(loss=opts.entropy_loss_coef * ent + opts.aux_loss_coef * balance, balance_loss=balance,
                             entropy=ent, experts_per_token=jnp.mean(jnp.sum(keep, axis=-1).astype(jnp.float32)),
                             counts={"": jnp.sum(keep, axis=0).astype(jnp.float32)})


def _check(cfg):
    if cfg.top_k > cfg.num_experts:
        raise ValueError(f"AdapterConfig.top_k={cfg.top_k} must be <= num_experts={cfg.num_experts} for dynmole")


DYNMOLE = ADAPTERS.add("dynmole", projection_adapter(_init, _delta, check=_check), options=DynMoLEOptions)
