"""Quantize the routed experts of a model: a pytree transformation of its params."""

from __future__ import annotations

from typing import Callable

import jax

from jmoe.quant.hqq import quantize_hqq
from jmoe.quant.qarray import QuantizedArray, check_bits, quantize_rtn

METHODS: dict[str, Callable[..., QuantizedArray]] = {"rtn": quantize_rtn, "hqq": quantize_hqq}
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def quantize_expert_weights(experts: dict, bits: int, *, group_size: int = 64, method: str = "hqq") -> dict:
    """Every weight matrix of a stacked expert dict (`w_up [E, d, f]`, ...) quantized group-wise
    along its contraction axis; other leaves unchanged."""
    check_bits(bits)
    if method not in METHODS:
        raise ValueError(f"quantization method {method!r} is unknown; known: {', '.join(METHODS)}")
    out = {}
    for name, w in experts.items():
        if name in EXPERT_WEIGHTS and isinstance(w, QuantizedArray):
            raise ValueError(f"experts[{name!r}] is already quantized ({w.bits} bits)")
        if name in EXPERT_WEIGHTS:
            if w.shape[-2] % group_size:
                raise ValueError(f"group_size={group_size} does not divide the contraction axis of experts[{name!r}] "
                                 f"{tuple(w.shape)}")
            out[name] = jax.jit(METHODS[method], static_argnums=(1, 2))(w, bits, group_size)
        else:
            out[name] = w
    return out


def quantize_lm_experts(params: dict, bits: int, *, group_size: int = 64, method: str = "hqq") -> dict:
    """An LM's params (`jmoe.nn.init_lm` layout) with every MoE layer's routed experts
    quantized; attention, norms, embeddings, routers and shared experts stay as they are."""
    layers = {}
    for name, layer in params["layers"].items():
        if "moe" in layer:
            moe = {**layer["moe"], "experts": quantize_expert_weights(layer["moe"]["experts"], bits,
                                                                      group_size=group_size, method=method)}
            layer = {**layer, "moe": moe}
        layers[name] = layer
    return {**params, "layers": layers}


def param_bytes(params) -> int:
    """Stored bytes of a params pytree, quantized leaves counted with their scales and zeros."""
    total = 0
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedArray)):
        total += leaf.nbytes if isinstance(leaf, QuantizedArray) else int(leaf.size * leaf.dtype.itemsize)
    return total
