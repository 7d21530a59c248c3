"""Expert feed-forward networks: parameters stacked on a leading expert axis.

Gated activations ("swiglu", "geglu") use `{"w_gate": [d, f], "w_up": [d, f], "w_down": [f, d]}`
per expert, "gelu" uses `{"w_up", "w_down"}`; routed experts stack them to `[E, ...]`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jmoe.quant.qarray import QuantizedArray, dense
from jmoe.registry import ACTIVATIONS, DISPATCHERS


@dataclasses.dataclass(frozen=True)
class Activation:
    """fn: the nonlinearity; gated: whether the FFN is act(x W_gate) * (x W_up)."""

    fn: Callable[[jax.Array], jax.Array]
    gated: bool


ACTIVATIONS.add("swiglu", Activation(jax.nn.silu, gated=True))
ACTIVATIONS.add("geglu", Activation(lambda x: jax.nn.gelu(x, approximate=False), gated=True))
ACTIVATIONS.add("gelu", Activation(lambda x: jax.nn.gelu(x, approximate=False), gated=False))


def _fan_in_normal(key, shape, fan_in, dtype):
    std = fan_in**-0.5
    return (std * jax.random.truncated_normal(key, -2.0, 2.0, shape)).astype(dtype)


def init_ffn(key: jax.Array, d_model: int, d_ff: int, activation: str, dtype="float32") -> dict:
    """One FFN: `w_gate [d, f]` (gated only), `w_up [d, f]`, `w_down [f, d]`."""
    act = ACTIVATIONS.get(activation)
    k_gate, k_up, k_down = jax.random.split(key, 3)
    params = {
        "w_up": _fan_in_normal(k_up, (d_model, d_ff), d_model, dtype),
        "w_down": _fan_in_normal(k_down, (d_ff, d_model), d_ff, dtype),
    }
    if act.gated:
        params["w_gate"] = _fan_in_normal(k_gate, (d_model, d_ff), d_model, dtype)
    return params


def init_experts(key: jax.Array, cfg, num_experts: int | None = None) -> dict:
    """Routed experts stacked on the expert axis: `w_gate/w_up [E, d, f]`, `w_down [E, f, d]`,
    and the per-expert vectors of a dispatch that declares some (`dispatch_vectors`), all ones."""
    E = cfg.num_experts if num_experts is None else num_experts
    keys = jax.random.split(key, E)
    params = jax.vmap(lambda k: init_ffn(k, cfg.d_model, cfg.d_ff, cfg.activation, cfg.param_dtype))(keys)
    for name, shape in dispatch_vectors(cfg).items():
        params[name] = jnp.ones((E,) + shape, cfg.param_dtype)
    return params


def dispatch_vectors(cfg) -> dict[str, tuple[int, ...]]:
    """{name: shape of one expert's vector} that the layer's dispatch keeps with each expert
    (declared by its `expert_vectors(cfg)` attribute, e.g. compressed experts); {} for most."""
    declared = getattr(DISPATCHERS.get(cfg.dispatch), "expert_vectors", None)
    return declared(cfg) if declared is not None else {}


Matmul = Callable[[jax.Array, jax.Array], jax.Array]
"""How `ffn` multiplies rows by a weight: `(x [n, a], w) -> [n, b]`, w one weight leaf of the
params (`[a, b]`, or `[E, a, b]` for a grouped matmul with its group sizes bound)."""


def ffn(
    params: dict,
    x: jax.Array,
    activation: str,
    dtype: jnp.dtype | str | None = None,
    *,
    matmul: Matmul = jnp.matmul,
) -> jax.Array:
    """Apply the FFN: `act(x W_gate) * (x W_up)` (gated) or `act(x W_up)`, then `W_down`.

    The one definition of the expert computation: one expert with the default dense matmul,
    or all experts over rows sorted by expert with a grouped matmul, e.g.
    `matmul=partial(jax.lax.ragged_dot, group_sizes=group_sizes)` or
    `partial(jmoe.dispatch.pallas.gmm, group_sizes=group_sizes)` and `[E, ...]` params.

    Args:
      params: `w_up [d, f]`, `w_down [f, d]` and, for gated activations, `w_gate [d, f]`
        (with a leading expert axis for a grouped `matmul`).
      x: [n, d].
      dtype: compute dtype (None: x's dtype); x and the weights are cast to it.
      matmul: `(x [n, a], w) -> [n, b]`; default `x @ w`. Quantized weights
        (`jmoe.quant.QuantizedArray`, any weight that is not a `jax.Array`) are dequantized to
        the compute dtype first, unless the matmul has `takes_quantized = True` (it reads them
        as stored).
    Returns:
      [n, d] in the compute dtype.
    """
    act = ACTIVATIONS.get(activation)
    dt = x.dtype if dtype is None else jnp.dtype(dtype)
    x = x.astype(dt)
    keep_quantized = getattr(matmul, "takes_quantized", False)

    def weight(name):
        w = params[name]
        return w if keep_quantized and not isinstance(w, jax.Array) else w.astype(dt)

    up = matmul(x, weight("w_up"))
    h = act.fn(matmul(x, weight("w_gate"))) * up if act.gated else act.fn(up)
    return matmul(h, weight("w_down"))


def expected_expert_shapes(cfg, num_experts: int | None = None) -> dict[str, tuple[int, ...]]:
    """The shapes `init_experts` produces for `cfg` (used to check user-supplied params)."""
    E = cfg.num_experts if num_experts is None else num_experts
    d, f = cfg.d_model, cfg.d_ff
    shapes = {"w_up": (E, d, f), "w_down": (E, f, d)}
    if ACTIVATIONS.get(cfg.activation).gated:
        shapes["w_gate"] = (E, d, f)
    shapes.update({name: (E,) + shape for name, shape in dispatch_vectors(cfg).items()})
    return shapes


def all_experts(params: dict, x: jax.Array, activation: str, dtype=None) -> jax.Array:
    """Every expert on every token (the reference computation).

    Args:
      params: stacked expert params, `[E, ...]` leaves.
      x: [T, d].
    Returns:
      [T, E, d].
    """
    return jax.vmap(lambda p: ffn(p, x, activation, dtype), out_axes=1)(params)


@jax.tree_util.register_pytree_node_class
class ExpertList:
    """Routed experts as E separate parameter dicts: a serving layout for the CPU.

    The stacked layout (`[E, ...]` leaves) is what training and every grouped matmul use. To
    run one expert, XLA:CPU first copies its slice `w[e]` out of the stack, whether e is
    dynamic or static, which a decoding step of a few tokens pays on every expert it runs.
    With E separate arrays the chunked dropless loop picks expert e's weights with a
    `lax.switch` and multiplies them in place (0.4-0.75x the MoE layer's time at decoding
    sizes, experiments/bench_decode_moe.py "layout"). The inference engine serves in this
    layout on CPU (`jmoe.infer.Engine(expert_layout=...)`); a dispatch that needs stacked
    weights gets them stacked (`stack`).

    experts: one dict per expert, leaves without the expert axis (`w_up [d, f]`, ...).
    """

    def __init__(self, experts):
        self.experts = tuple(experts)
        if not self.experts:
            raise ValueError("ExpertList needs at least one expert")

    @classmethod
    def split(cls, stacked) -> "ExpertList":
        """Stacked `[E, ...]` expert params -> E per-expert dicts (copies once)."""
        if isinstance(stacked, cls):
            return stacked
        E = jax.tree.leaves(stacked)[0].shape[0]
        return cls(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(E))

    def stack(self):
        """The stacked layout, `[E, ...]` leaves. Quantized weights stay quantized when every
        expert has the same format, and are dequantized when their bit widths differ (a
        mixed-precision model: one stacked array cannot hold several widths)."""
        return jax.tree.map(_stack_weights, *self.experts, is_leaf=lambda x: isinstance(x, QuantizedArray))

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def shapes(self) -> dict:
        """Leaf shapes of the stacked layout: {name: (E, ...)}."""
        return {name: (self.num_experts, *w.shape) for name, w in self.experts[0].items()}

    def tree_flatten(self):
        return self.experts, None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.experts = tuple(children)
        return obj

    def __repr__(self) -> str:
        return f"ExpertList({self.num_experts} experts, {self.shapes})"


def _stack_weights(*ws):
    if not isinstance(ws[0], QuantizedArray):
        return jnp.stack(ws)
    if len({(type(w), getattr(w, "bits", None), getattr(w, "group_size", None)) for w in ws}) > 1:
        return jnp.stack([dense(w) for w in ws])
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *ws)


def mixed_widths(expert_params) -> bool:
    """Whether the experts are an `ExpertList` whose quantized weights differ in format (bit
    width or group size): `stacked_experts` would dequantize them."""
    if not isinstance(expert_params, ExpertList):
        return False
    return any(len({(getattr(e[n], "bits", None), getattr(e[n], "group_size", None)) for e in expert_params.experts}) > 1
               for n in expert_params.experts[0])


def num_experts_of(expert_params) -> int:
    """E of stacked expert params or an `ExpertList`."""
    if isinstance(expert_params, ExpertList):
        return expert_params.num_experts
    return jax.tree.leaves(expert_params)[0].shape[0]


def stacked_experts(expert_params):
    """Expert params in the stacked layout (an `ExpertList` is stacked, a copy)."""
    return expert_params.stack() if isinstance(expert_params, ExpertList) else expert_params
