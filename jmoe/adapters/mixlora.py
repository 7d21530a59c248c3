"""MixLoRA: top-k LoRA experts on a frozen FFN (TUDB-Labs/MixLoRA; training code in MoE-PEFT).

Expert e is the frozen FFN with its own LoRA on each targeted projection,
W_e = W + (alpha / r) A_e B_e; a softmax router picks k experts per token and renormalises
their weights. The frozen `x W_gate` and `x W_up` are computed once per token, and because
W_down is linear, sum_e w_e h_e W_down = (sum_e w_e h_e) W_down runs once per token too. The
token-slots are sorted by expert and each expert's LoRA factors run on its slots, through the
dropless machinery of `jmoe.dispatch`: grouped matmuls, or on CPU the chunked loop (which
takes every expert's gate and up A on every token at once, a rank E * r matmul, so that its
rows stay narrow); small adapters (E * r <= 32) run every expert's A at once and mask each
slot to its expert's columns instead (option `impl`). So the layer costs one frozen FFN plus
the experts' small matmuls and the k activations of each token.
Auxiliary loss: aux_loss_coef * E * sum_e f_e P_e (Mixtral's, k at balance), with f_e the
share of tokens routed to e and P_e the mean router probability.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.adapters.base import Adapter, AdapterAux, dropout, init_lora
from jmoe.dispatch.chunked import chunked_expert_combine
from jmoe.dispatch.permute import permute, unpermute_combine
from jmoe.dispatch.sorting import sort_slots
from jmoe.options import Options, option
from jmoe.registry import ACTIVATIONS, ADAPTERS


@dataclasses.dataclass(frozen=True)
class MixLoRAOptions(Options):
    """aux_loss_coef: weight of the balance loss. router_init_std: std of the router's
    normal init. impl: how the experts' LoRA factors run: over the token-slots sorted by expert
    with "grouped" (grouped matmuls, `jax.lax.ragged_dot`) or "chunked" (the dropless loop of
    `jmoe.dispatch.chunked`, which XLA:CPU runs far faster than its grouped matmul), or
    "masked": every expert's A at once (one rank E*r matmul, the cost of a plain LoRA of that
    rank) and each slot's B through its expert's columns, no sorting; "auto": masked while
    E * r <= 32 (small adapters, where sorting costs more than the matmuls it saves), else
    chunked on CPU and grouped elsewhere. block_size: rows per chunk of "chunked"."""

    aux_loss_coef: float = option(0.01, ge=0.0)
    router_init_std: float = option(0.02, gt=0.0)
    impl: str = option("auto", choices=("auto", "grouped", "chunked", "masked"))
    block_size: int = option(256, ge=1)


def _init(key, shapes, cfg, dtype):
    k_router, *keys = jax.random.split(key, len(shapes) + 1)
    d_model = shapes["down"][1] if "down" in shapes else next(iter(shapes.values()))[0]
    std = cfg.options.router_init_std
    params = {"router": {"w": (std * jax.random.normal(k_router, (d_model, cfg.num_experts))).astype(dtype)}}
    for k, (name, (d_in, d_out)) in zip(keys, shapes.items()):
        params[name] = init_lora(k, d_in, d_out, cfg.rank, dtype, experts=cfg.num_experts)
    return params


def route(router: dict, x: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(expert ids [T, k], renormalised weights [T, k], probabilities [T, E]) of tokens x [T, d]."""
    probs = jax.nn.softmax(x.astype(jnp.float32) @ router["w"].astype(jnp.float32), axis=-1)
    w, ids = lax.top_k(probs, k)
    return ids.astype(jnp.int32), w / jnp.sum(w, axis=-1, keepdims=True), probs


def _apply(base, params, x, activation, cfg, *, state=None, key=None):
    E, k = cfg.num_experts, cfg.top_k
    ids, weights, probs = route(params["router"], x, k)
    impl = cfg.options.impl
    if impl == "auto":
        impl = "masked" if E * cfg.rank <= MASKED_MAX_RANK else "chunked" if jax.default_backend() == "cpu" else "grouped"
    if impl == "masked":
        y = _masked(base, params, x, activation, cfg, ids, weights, key)
    else:
        order, sizes = sort_slots(ids, jnp.ones(ids.shape, bool), E)  # the token-slots by expert
        y = (_grouped if impl == "grouped" else _chunked)(base, params, x, activation, cfg, order, sizes, weights, key)
    counts = jnp.zeros((E,), jnp.float32).at[ids.reshape(-1)].add(1.0)
    balance = E * jnp.sum(counts / ids.shape[0] * jnp.mean(probs, axis=0))
    entropy = jnp.mean(-jnp.sum(probs * jnp.log(probs + 1e-20), axis=-1)) / jnp.log(E) if E > 1 else jnp.zeros(())
    aux = AdapterAux(loss=cfg.options.aux_loss_coef * balance, balance_loss=balance, entropy=entropy,
                     experts_per_token=jnp.float32(k), counts={"router": counts})
    return y, aux


MASKED_MAX_RANK = 32
""""auto" takes the masked path while num_experts * rank is at most this. Training step of the
chunked path over the masked one on XLA:CPU (d=512, f=1408, 4,096 tokens, k=2, 2 cores):
1.05x at E * r = 16, 0.99x and 1.00x at 32 (E=8, r=4 and E=4, r=8), 0.93x at 64."""


def _columns(a: jax.Array, dtype) -> jax.Array:
    """Every expert's A [E, n, r] side by side as one rank E * r factor [n, E * r]."""
    return jnp.moveaxis(a.astype(dtype), 0, 1).reshape(a.shape[1], -1)


def _rows(b: jax.Array, dtype) -> jax.Array:
    """Every expert's B [E, r, m] stacked as one rank E * r factor [E * r, m]."""
    return b.astype(dtype).reshape(-1, b.shape[-1])


def _masked(base, params, x, activation, cfg, ids, weights, key):
    """All experts' A factors in one matmul; each token-slot keeps its expert's r columns
    (a one-hot mask over experts) before the B factors, as one matmul of rank E * r. The down
    LoRA's output is linear in its slots, so their weighted sum meets B_down once per token."""
    E, k, r, s = cfg.num_experts, cfg.top_k, cfg.rank, cfg.scaling
    act = ACTIVATIONS.get(activation)
    T, dt = x.shape[0], x.dtype
    k_in, k_h = jax.random.split(key) if key is not None else (None, None)
    mask = jax.nn.one_hot(ids, E, dtype=dt)[..., None]  # [T, k, E, 1]
    xs = dropout(x, cfg.dropout, k_in)

    def delta(name):  # [T, k, f]: each slot's (alpha / r) x A_e B_e
        p = params[name]
        z = (xs @ _columns(p["A"], dt)).reshape(T, 1, E, r)
        return s * ((mask * z).reshape(T * k, E * r) @ _rows(p["B"], dt)).reshape(T, k, -1)

    def projected(name):
        y = (x @ base[f"w_{name}"].astype(dt))[:, None, :]
        return y + delta(name) if name in params else y

    up = projected("up")
    h = act.fn(projected("gate")) * up if act.gated else act.fn(up)  # [T, k or 1, f]
    h = jnp.broadcast_to(h, (T, k, h.shape[-1]))
    w = weights.astype(dt)[..., None]  # [T, k, 1]
    y = jnp.sum(w * h, axis=1) @ base["w_down"].astype(dt)
    if "down" in params:
        p = params["down"]
        hd = dropout(h, cfg.dropout, k_h)
        f = hd.shape[-1]
        z = (hd.reshape(T * k, f) @ _columns(p["A"], dt)).reshape(T, k, E, r)
        z = jnp.sum(w[..., None] * mask * z, axis=1)  # [T, E, r]: each slot's expert columns, weighted
        y = y + s * (z.reshape(T, E * r) @ _rows(p["B"], dt))
    return y


def _chunked(base, params, x, activation, cfg, order, sizes, weights, key):
    """The dropless chunked loop of `jmoe.dispatch.chunked` with each expert's adapted FFN up to
    its hidden activation, on narrow rows. Every expert's A of the gate and up LoRAs runs on
    every token at once (x A: rank E * r, the cost of a plain LoRA of that rank), so a
    token-slot's row carries [x A_up, x A_gate, x W_up, x W_gate] (and the dropout mask of the
    down LoRA's input) rather than x itself; its expert picks its own r columns (a one-hot
    selection, `sel`) and returns [h, h A_d] with h A_d placed in its expert's columns, so
    the weighted sum over a token's slots meets every B_down at once, as one matmul of rank
    E * r. Rows of 2 E r + 2 f and outputs of f + E r instead of d + 2 f and f + d: the loop's
    gathers and scatters, which are most of its cost on CPU, move fewer bytes."""
    E, k, r, s = cfg.num_experts, cfg.top_k, cfg.rank, cfg.scaling
    act = ACTIVATIONS.get(activation)
    T = x.shape[0]
    dt = x.dtype
    f = base["w_down"].shape[0]
    k_in, k_h = jax.random.split(key) if key is not None else (None, None)
    xs = dropout(x, cfg.dropout, k_in)
    lora_in = [n for n in ("up", "gate") if n in params and (n == "up" or act.gated)]
    parts = [xs @ _columns(params[n]["A"], dt) for n in lora_in]
    parts.append(x @ base["w_up"].astype(dt))
    if act.gated:
        parts.append(x @ base["w_gate"].astype(dt))
    h_mask = "down" in params and k_h is not None and cfg.dropout > 0
    if h_mask:  # one dropout mask per token for the down LoRA's input (inverted dropout)
        parts.append(dropout(jnp.ones((T, f), dt), cfg.dropout, k_h))
    rows = jnp.concatenate(parts, axis=-1)
    z_at = {n: i * E * r for i, n in enumerate(lora_in)}
    o = len(lora_in) * E * r  # where x W_up starts

    def expert(p, row):
        pick = lambda n: row[:, z_at[n]:z_at[n] + E * r] @ p["sel"]  # [n, r]: this expert's x A_n
        u = row[:, o:o + f]
        if "up" in z_at:
            u = u + s * (pick("up") @ p["up"]["B"].astype(dt))
        if act.gated:
            g = row[:, o + f:o + 2 * f]
            if "gate" in z_at:
                g = g + s * (pick("gate") @ p["gate"]["B"].astype(dt))
            h = act.fn(g) * u
        else:
            h = act.fn(u)
        if "down" not in p:
            return h
        hl = h * row[:, -f:] if h_mask else h
        return jnp.concatenate([h, (hl @ p["down"]["A"].astype(dt)) @ p["sel"].T], axis=-1)

    experts = {n: {"B": params[n]["B"]} for n in lora_in}
    if "down" in params:
        experts["down"] = {"A": params["down"]["A"]}
    experts["sel"] = lax.stop_gradient(jnp.eye(E * r, dtype=dt).reshape(E * r, E, r).transpose(1, 0, 2))  # [E, E*r, r]
    out = chunked_expert_combine(rows, weights.reshape(-1), order, sizes, experts, expert, k, cfg.options.block_size)
    y = out[:, :f] @ base["w_down"].astype(dt)
    if "down" in params:
        y = y + s * (out[:, f:] @ _rows(params["down"]["B"], dt))
    return y


def _grouped(base, params, x, activation, cfg, order, sizes, weights, key):
    """Token-slots sorted by expert, each LoRA factor a grouped matmul (the dropless path)."""
    k, s = cfg.top_k, cfg.scaling
    act = ACTIVATIONS.get(activation)
    grouped = partial(lax.ragged_dot, group_sizes=sizes)
    k_in, k_h = jax.random.split(key) if key is not None else (None, None)

    def lora(name, rows):
        p = params[name]
        return s * grouped(grouped(rows, p["A"].astype(rows.dtype)), p["B"].astype(rows.dtype))

    xs = permute(dropout(x, cfg.dropout, k_in), order, k)

    def projected(name):
        y = permute(x @ base[f"w_{name}"].astype(x.dtype), order, k)
        return y + lora(name, xs).astype(y.dtype) if name in params else y

    up = projected("up")
    h = act.fn(projected("gate")) * up if act.gated else act.fn(up)
    y = unpermute_combine(h, order, weights).astype(x.dtype) @ base["w_down"].astype(x.dtype)
    if "down" in params:
        y = y + unpermute_combine(lora("down", dropout(h, cfg.dropout, k_h)), order, weights).astype(y.dtype)
    return y


def _check(cfg):
    if cfg.top_k > cfg.num_experts:
        raise ValueError(f"AdapterConfig.top_k={cfg.top_k} must be <= num_experts={cfg.num_experts} for mixlora")


MIXLORA = ADAPTERS.add("mixlora", Adapter(init=_init, apply=_apply, check=_check), options=MixLoRAOptions)
