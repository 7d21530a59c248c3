"""Quantize the routed experts of a model: a pytree transformation of its params."""

from __future__ import annotations

from functools import lru_cache, partial
from numbers import Integral
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.quant.gptq import gptq_experts
from jmoe.quant.hqq import quantize_hqq
from jmoe.quant.qarray import QuantizedArray, check_bits, check_weight, quantize_rtn

METHODS: dict[str, Callable[..., QuantizedArray]] = {"rtn": quantize_rtn, "hqq": quantize_hqq}
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
WEIGHTS_OF_INPUT = {"w_gate": "h_in", "w_up": "h_in", "w_down": "h_hidden"}  # GPTQ's Hessian of each weight


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
            check_weight(w, group_size, f"experts[{name!r}]")
            out[name] = jax.jit(METHODS[method], static_argnums=(1, 2))(w, bits, group_size)
        else:
            out[name] = w
    return out


def quantize_layer_experts(experts, bits, *, group_size: int = 64, method: str = "hqq",
                           hessians: dict | None = None):
    """The routed experts of one layer quantized, `bits` one width for all or one per expert.

    experts: stacked `[E, ...]` expert params or an `ExpertList`. hessians (GPTQ):
    {"h_in": [E, d, d], "h_hidden": [E, f, f]} (`jmoe.quant.calibrate`). Returns stacked
    `QuantizedArray` weights when every expert has the same width, else an `ExpertList` (one
    stacked array cannot hold several widths). Experts of one width are quantized together.
    """
    from jmoe.experts import ExpertList, stacked_experts

    stacked = stacked_experts(experts)
    E = jax.tree.leaves(stacked)[0].shape[0]
    if isinstance(bits, (str, bytes)) or not isinstance(bits, (Integral, Sequence, np.ndarray)):
        raise ValueError(f"bits={bits!r} must be one integer width or a list of one width per expert")
    per_expert = [check_bits(bits)] * E if isinstance(bits, Integral) else [check_bits(b) for b in bits]
    if len(per_expert) != E:
        raise ValueError(f"bits has {len(per_expert)} widths for {E} experts")
    if method == "gptq":
        if hessians is None:
            raise ValueError("GPTQ needs calibration Hessians (jmoe.quant.calibrate)")
        for name, w in stacked.items():
            if name not in EXPERT_WEIGHTS:
                continue
            h_name = WEIGHTS_OF_INPUT[name]
            a = w.shape[-2]
            if h_name not in hessians:
                raise ValueError(f"hessians has no {h_name!r}, the input Hessians of experts[{name!r}]")
            if tuple(jnp.shape(hessians[h_name])) != (E, a, a):
                raise ValueError(f"hessians[{h_name!r}] has shape {tuple(jnp.shape(hessians[h_name]))}, expected "
                                 f"{(E, a, a)} for experts[{name!r}] {tuple(w.shape)}")
    if method not in METHODS and method != "gptq":
        raise ValueError(f"quantization method {method!r} is unknown; known: {', '.join([*METHODS, 'gptq'])}")
    for name, w in stacked.items():
        if name in EXPERT_WEIGHTS and isinstance(w, QuantizedArray):
            raise ValueError(f"experts[{name!r}] is already quantized ({w.bits} bits)")
        if name in EXPERT_WEIGHTS:
            check_weight(w, group_size, f"experts[{name!r}]")
    by_width: dict[int, dict] = {}
    for b in sorted(set(per_expert)):
        idx = np.asarray([e for e in range(E) if per_expert[e] == b])
        part = {}
        for name, w in stacked.items():
            if name not in EXPERT_WEIGHTS:
                part[name] = w[idx]
            elif method == "gptq":
                h = jnp.asarray(hessians[WEIGHTS_OF_INPUT[name]])[idx]
                part[name] = _gptq(w[idx], h, b, group_size)
            else:
                part[name] = _quantizer(method)(w[idx], b, group_size)
        by_width[b] = (idx, part)
    if len(by_width) == 1:
        return by_width[per_expert[0]][1]
    out: list = [None] * E
    for idx, part in by_width.values():
        for j, e in enumerate(idx):
            out[int(e)] = jax.tree.map(lambda a, j=j: a[j], part)
    return ExpertList(out)


@lru_cache(maxsize=None)
def _quantizer(method: str):
    return jax.jit(METHODS[method], static_argnums=(1, 2))


@partial(jax.jit, static_argnums=(2, 3))
def _gptq(w, h, bits, group_size):
    return gptq_experts(w, h, bits, group_size)


def quantize_lm_experts(params: dict, bits, *, group_size: int = 64, method: str = "hqq",
                        calibration: dict | None = None) -> dict:
    """An LM's params (`jmoe.nn.init_lm` layout) with every MoE layer's routed experts
    quantized; attention, norms, embeddings, routers and shared experts stay as they are.

    bits: one width for every expert, or {layer: [width per expert]} (e.g. from
    `jmoe.quant.allocate_bits`). calibration: `jmoe.quant.calibrate` output (GPTQ's Hessians).
    """
    if not isinstance(params, dict) or not isinstance(params.get("layers"), dict):
        raise ValueError("params must be a language model's parameters (jmoe.nn.init_lm), with 'layers'")
    layers = {}
    moe_layers = [name for name, layer in params["layers"].items() if "moe" in layer]
    if isinstance(bits, dict):
        missing = [l for l in moe_layers if l not in bits]
        if missing:
            raise ValueError(f"bits has no widths for MoE layer {missing[0]}")
    for name, layer in params["layers"].items():
        if "moe" in layer:
            hess = None
            if method == "gptq":
                if calibration is None or name not in calibration.get("layers", {}):
                    raise ValueError(f"GPTQ needs calibration statistics of MoE layer {name}")
                hess = calibration["layers"][name]
            b = bits[name] if isinstance(bits, dict) else bits
            experts = quantize_layer_experts(layer["moe"]["experts"], b, group_size=group_size, method=method,
                                             hessians=hess)
            layer = {**layer, "moe": {**layer["moe"], "experts": experts}}
        layers[name] = layer
    return {**params, "layers": layers}


def param_bytes(params) -> int:
    """Stored bytes of a params pytree, quantized leaves counted with their scales and zeros."""
    total = 0
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedArray)):
        total += leaf.nbytes if isinstance(leaf, QuantizedArray) else int(leaf.size * leaf.dtype.itemsize)
    return total
