"""What every adapter kind shares: the registry entry, LoRA factors, the adapted FFN, and
what an adapted layer reports.

An adapter kind is one file with one `ADAPTERS.add(name, Adapter(...), options=...)`. It
adds to a frozen FFN `act(x W_gate) * (x W_up) W_down` of a dense layer. Kinds that adapt
each projection on its own (LoRA, SMoRA, DynMoLE) give `projection_adapter` the delta of one
projection; MixLoRA, whose experts are whole FFNs, gives its own `apply`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jmoe.adapters.config import AdapterConfig
from jmoe.checks import check_int, check_key
from jmoe.registry import ACTIVATIONS


@struct.dataclass
class AdapterAux:
    """What an adapted FFN reports besides its output.

    loss: scalar to add to the training loss (the kind's weighted auxiliary losses).
    balance_loss: scalar balance loss (E * sum_e f_e P_e; 0 for kinds without one).
    entropy: scalar mean normalised router entropy (0 without a router).
    experts_per_token: scalar mean number of experts (or ranks) a token used.
    counts: {name: [C] selections per expert or rank} of each router (state updates).
    router_logits: [T, E] each token's router logits, for kinds whose router is trained
      against outside labels (twin: the task of each input); None for the others.
    """

    loss: jax.Array
    balance_loss: jax.Array
    entropy: jax.Array
    experts_per_token: jax.Array
    counts: dict
    router_logits: jax.Array | None = None


def no_aux() -> AdapterAux:
    """The `AdapterAux` of an adapter without a router: zeros and no counts."""
    z = jnp.zeros((), jnp.float32)
    return AdapterAux(loss=z, balance_loss=z, entropy=z, experts_per_token=z, counts={})


def mean_aux(auxes: list[AdapterAux], counts: dict) -> AdapterAux:
    """The mean of the scalar statistics of several routers, with their counts by name."""
    if not auxes:
        return dataclasses.replace(no_aux(), counts=counts)
    mean = lambda f: jnp.mean(jnp.stack([f(a) for a in auxes]))
    return AdapterAux(loss=mean(lambda a: a.loss), balance_loss=mean(lambda a: a.balance_loss),
                      entropy=mean(lambda a: a.entropy), experts_per_token=mean(lambda a: a.experts_per_token),
                      counts=counts)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """An adapter kind (a `jmoe.registry.ADAPTERS` entry).

    init: `(key, shapes {proj: (d_in, d_out)}, cfg, dtype) -> params` of one adapted FFN.
    apply: `(base, params, x [T, d], activation, cfg, *, state, key) -> (y [T, d], AdapterAux)`:
      the adapted FFN on tokens x; `base` holds the frozen `w_gate`, `w_up`, `w_down`.
    init_state: `(shapes, cfg) -> state` of non-gradient variables, or None.
    update_state: `(state, counts, cfg) -> state`, once per training step, or None.
    check: `(cfg) -> None`, raising ValueError for settings the kind cannot take.
    uses: the routing fields of `AdapterConfig` the kind reads, of "num_experts" and "top_k"
      (a command refuses the others when they are given).
    """

    init: Callable
    apply: Callable
    init_state: Callable | None = None
    update_state: Callable | None = None
    check: Callable = lambda cfg: None
    uses: tuple = ("num_experts", "top_k")


# ------------------------------------------------------------------------- LoRA factors


def lora_a(key: jax.Array, shape: tuple[int, ...], d_in: int, dtype) -> jax.Array:
    """A LoRA down-projection: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))
    (PyTorch's `nn.Linear` init, which the reference implementations keep)."""
    bound = d_in**-0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def init_lora(key: jax.Array, d_in: int, d_out: int, rank: int, dtype, experts: int | None = None) -> dict:
    """`{"A": [d_in, r], "B": [r, d_out]}` (a leading [E] axis with `experts`); B starts at
    zero, so the adapted model starts as the frozen one."""
    sizes = (("d_in", d_in), ("d_out", d_out), ("rank", rank)) + ((("experts", experts),) if experts is not None else ())
    for name, v in sizes:
        check_int(v, name)
    check_key(key)
    lead = () if experts is None else (experts,)
    return {"A": lora_a(key, lead + (d_in, rank), d_in, dtype), "B": jnp.zeros(lead + (rank, d_out), dtype)}


def lora_delta(p: dict, x: jax.Array, scale: float) -> jax.Array:
    """scale * (x A) B. x: [T, d_in] -> [T, d_out]."""
    return scale * ((x @ p["A"].astype(x.dtype)) @ p["B"].astype(x.dtype))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout while training (a key), the identity otherwise."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def ffn_shapes(d_model: int, d_ff: int, activation: str, targets: tuple) -> dict[str, tuple[int, int]]:
    """{proj: (d_in, d_out)} of the FFN projections in `targets` (no "gate" without a gated
    activation)."""
    shapes = {"gate": (d_model, d_ff), "up": (d_model, d_ff), "down": (d_ff, d_model)}
    gated = ACTIVATIONS.get(activation).gated
    return {t: shapes[t] for t in targets if t != "gate" or gated}


def adapted_ffn(base: dict, x: jax.Array, activation: str, project: Callable) -> jax.Array:
    """The FFN with every projection through `project(name, inputs, frozen weight)`.
    x: [T, d] -> [T, d]."""
    act = ACTIVATIONS.get(activation)
    up = project("up", x, base["w_up"])
    h = act.fn(project("gate", x, base["w_gate"])) * up if act.gated else act.fn(up)
    return project("down", h, base["w_down"])


def projection_adapter(init_projection: Callable, delta: Callable, **kw) -> Adapter:
    """An `Adapter` that adapts each targeted projection on its own.

    init_projection: `(key, d_in, d_out, cfg, dtype) -> params` of one projection.
    delta: `(params, x [T, d_in], cfg, *, state, key) -> (delta [T, d_out], AdapterAux | None)`
      added to the frozen projection's output.
    """

    def init(key, shapes, cfg, dtype):
        keys = jax.random.split(key, len(shapes))
        return {name: init_projection(k, d_in, d_out, cfg, dtype) for k, (name, (d_in, d_out)) in zip(keys, shapes.items())}

    def apply(base, params, x, activation, cfg, *, state=None, key=None):
        auxes, counts = [], {}
        keys = dict(zip(params, jax.random.split(key, len(params)))) if key is not None and params else {}

        def project(name, inputs, w):
            y = inputs @ w.astype(inputs.dtype)
            if name not in params:
                return y
            d, aux = delta(params[name], inputs, cfg, state=(state or {}).get(name), key=keys.get(name))
            if aux is not None:
                auxes.append(aux)
                for c, v in aux.counts.items():
                    counts[name if c == "" else f"{name}/{c}"] = v
            return y + d.astype(y.dtype)

        y = adapted_ffn(base, x, activation, project)
        return y, mean_aux(auxes, counts)

    return Adapter(init=init, apply=apply, **kw)


def check_rank(cfg: AdapterConfig, shapes: dict[str, tuple[int, int]], where: str) -> None:
    """A LoRA rank above a projection's width is refused (its update could not use it)."""
    for name, (d_in, d_out) in shapes.items():
        if cfg.rank > min(d_in, d_out):
            raise ValueError(f"AdapterConfig.rank={cfg.rank} exceeds the width of {where} {name} "
                             f"({d_in} -> {d_out})")
