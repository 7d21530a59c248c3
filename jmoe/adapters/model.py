"""Adapters on a language model: their parameters, state and checks, and how a decoder
layer runs with them.

The adapters of a model live beside its frozen parameters, `params["adapters"]`:

  {"<layer>": {"ffn": <the kind's FFN adapter>,           dense FFN layers
               "experts": {"w_up": {"A", "B"}, ...},      MoE layers: LoRA on the routed experts
               "attn": {"wq": {"A", "B"}, ...}}}          plain LoRA on attention weights

so the trainable tree is one subtree and the frozen model stays bitwise unchanged. Dense FFN
layers run the kind's adapted FFN (`jmoe.registry.ADAPTERS`). The routed experts of an MoE
layer take a plain LoRA per expert (`moe_mode="per_expert"`, A [E, d_in, r]) or one shared
by all of them ("shared"), added to their weights; attention weights take a plain LoRA the
same way (W + (alpha / r) A B, reshaped to the weight), which works for every attention
kind and for cached decoding.
"""

from __future__ import annotations

import math
from functools import lru_cache

import jax
import jax.numpy as jnp

from jmoe.checks import check_key
from jmoe.adapters.base import AdapterAux, check_rank, ffn_shapes, init_lora
from jmoe.adapters.config import FFN_TARGETS, FFN_WEIGHT, AdapterConfig
from jmoe.registry import ADAPTERS


def _attention_shapes(cfg) -> dict[str, tuple[int, ...]]:
    from jmoe.nn.attention import init_attention

    shapes = jax.eval_shape(lambda: init_attention(jax.random.key(0), cfg.d_model, cfg.n_heads, cfg.kv_heads,
                                                   cfg.head_dim, "float32", cfg.attention))
    return {name: tuple(a.shape) for name, a in shapes.items() if len(a.shape) >= 2}


def matrix_shape(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(d_in, d_out) of an attention weight: "wo" [H, D, d] maps H*D -> d, the others
    [d_in, ...] map d_in -> the rest."""
    d_in = math.prod(shape[:-1]) if name == "wo" else shape[0]
    return d_in, math.prod(shape) // d_in


def adapter_layers(cfg) -> list[int]:
    """The layers of LMConfig `cfg` that take adapters."""
    a = cfg.adapter
    return [] if a is None else [i for i in range(cfg.n_layers) if a.applies_to(i)]


def check_adapter(cfg) -> None:
    """ValueError naming what does not fit: layers out of range, unknown attention weights,
    a rank above a projection's width."""
    a: AdapterConfig = cfg.adapter
    if a.layers is not None:
        bad = [i for i in a.layers if i >= cfg.n_layers]
        if bad:
            raise ValueError(f"AdapterConfig.layers has layer {bad[0]}, but the model has {cfg.n_layers} layers "
                             f"(0..{cfg.n_layers - 1})")
    if a.attn_targets:
        if cfg.attention.experts:
            raise ValueError(f"AdapterConfig.attn_targets: this model's attention is {cfg.attention.experts} attention "
                             "experts, which take no attention LoRA; adapt its FFNs (ffn_targets) only")
        shapes = _attention_shapes(cfg)
        unknown = [t for t in a.attn_targets if t not in shapes]
        if unknown:
            raise ValueError(f"AdapterConfig.attn_targets has {unknown[0]!r}, which this model's {cfg.attention.kind} "
                             f"attention does not have; it has {', '.join(shapes)}")
        check_rank(a, {n: matrix_shape(n, s) for n, s in shapes.items() if n in a.attn_targets}, "attention")
    for i in adapter_layers(cfg):
        if cfg.is_moe_layer(i):
            moe = cfg.moe_for(i)
            check_rank(a, ffn_shapes(cfg.d_model, moe.d_ff, moe.activation, a.ffn_targets), f"layer {i}'s experts'")
        else:
            check_rank(a, ffn_shapes(cfg.d_model, cfg.d_ff, cfg.activation, a.ffn_targets), f"layer {i}'s FFN")


def init_adapters(key: jax.Array, cfg) -> dict:
    """Fresh adapter parameters of LMConfig `cfg` (see the module docstring for the tree).
    Every B starts at zero: the adapted model starts as the frozen one."""
    a: AdapterConfig = cfg.adapter
    if a is None:
        raise ValueError("cfg has no adapter (LMConfig.adapter is None): nothing to initialise")
    check_key(key)
    kind = ADAPTERS.get(a.kind)
    dt = cfg.param_dtype
    out = {}
    for i in adapter_layers(cfg):
        k_ffn, k_attn = jax.random.split(jax.random.fold_in(key, i))
        layer = {}
        if cfg.is_moe_layer(i):
            moe = cfg.moe_for(i)
            shapes = ffn_shapes(cfg.d_model, moe.d_ff, moe.activation, a.ffn_targets)
            E = None if a.moe_mode == "shared" else moe.num_experts
            keys = jax.random.split(k_ffn, max(len(shapes), 1))
            experts = {FFN_WEIGHT[n]: init_lora(k, d_in, d_out, a.rank, dt, experts=E)
                       for k, (n, (d_in, d_out)) in zip(keys, shapes.items())}
            if experts:
                layer["experts"] = experts
        else:
            shapes = ffn_shapes(cfg.d_model, cfg.d_ff, cfg.activation, a.ffn_targets)
            if shapes:
                layer["ffn"] = kind.init(k_ffn, shapes, a, dt)
        if a.attn_targets:
            attn = _attention_shapes(cfg)
            keys = jax.random.split(k_attn, len(a.attn_targets))
            layer["attn"] = {n: init_lora(k, *matrix_shape(n, attn[n]), a.rank, dt) for k, n in zip(keys, a.attn_targets)}
        out[str(i)] = layer
    return out


def init_adapter_state(cfg) -> dict:
    """{"adapter/<layer>": state} of the kinds that keep non-gradient state (SMoRA's bias)."""
    a = cfg.adapter
    if a is None or ADAPTERS.get(a.kind).init_state is None:
        return {}
    kind = ADAPTERS.get(a.kind)
    return {f"adapter/{i}": kind.init_state(ffn_shapes(cfg.d_model, cfg.d_ff, cfg.activation, a.ffn_targets), a)
            for i in adapter_layers(cfg) if not cfg.is_moe_layer(i) and a.ffn_targets}


def update_adapter_state(state, counts, cfg):
    """One layer's adapter state after a training step with router `counts` (the kind's
    `update_state`; unchanged for kinds without state)."""
    update = ADAPTERS.get(cfg.adapter.kind).update_state
    return state if update is None else update(state, counts, cfg.adapter)


def _merged(w: jax.Array, lora: dict, scale: float, experts: bool = False) -> jax.Array:
    """w + scale * A B reshaped to w. With `experts`, w is [E, ...] and the LoRA has its own
    expert axis (A [E, d_in, r]) or is one for every expert (A [d_in, r])."""
    delta = scale * (lora["A"].astype(jnp.float32) @ lora["B"].astype(jnp.float32))
    target = w.shape[1:] if experts and delta.ndim == 2 else w.shape
    return (w.astype(jnp.float32) + delta.reshape(target)).astype(w.dtype)


def adapted_attention(p_attn: dict, lora: dict, cfg: AdapterConfig) -> dict:
    """Attention params with each adapted weight replaced by W + (alpha / r) A B."""
    return {**p_attn, **{n: _merged(p_attn[n], ab, cfg.scaling) for n, ab in lora.items()}}


def adapted_experts(experts, lora: dict, cfg: AdapterConfig):
    """Routed experts with their LoRA added: per expert (A [E, d_in, r]) or one for all
    ("shared"). Stacked experts ([E, ...] leaves) or an `ExpertList` (the serving layout) of
    float weights."""
    from jmoe.experts import ExpertList

    if isinstance(experts, ExpertList):
        per = lambda ab, e: ab if ab["A"].ndim == 2 else {"A": ab["A"][e], "B": ab["B"][e]}
        return ExpertList({**w, **{n: _merged(w[n], per(ab, e), cfg.scaling) for n, ab in lora.items()}}
                          for e, w in enumerate(experts.experts))
    if not isinstance(experts, dict) or any(not hasattr(experts[n], "dtype") for n in lora):
        raise ValueError("LoRA on routed experts needs their float weights (quantized experts cannot take it)")
    return {**experts, **{n: _merged(experts[n], ab, cfg.scaling, experts=True) for n, ab in lora.items()}}


def adapted_ffn_layer(p_ffn: dict, ad_ffn: dict, h: jax.Array, cfg, *, state=None, key=None):
    """A dense layer's FFN with the adapter: h [B, S, d] -> ([B, S, d], AdapterAux)."""
    x = h.reshape(-1, h.shape[-1])
    y, aux = ADAPTERS.get(cfg.adapter.kind).apply(p_ffn, ad_ffn, x, cfg.activation, cfg.adapter, state=state, key=key)
    return y.reshape(h.shape), aux


def mean_adapter_loss(auxes: list[AdapterAux]) -> jax.Array:
    """The adapters' auxiliary loss: the mean over adapted layers (each reference method
    pools its layers' router statistics into one loss)."""
    if not auxes:
        return jnp.zeros((), jnp.float32)
    return jnp.mean(jnp.stack([a.loss for a in auxes]))


def fold_weight_lora(params: dict, cfg) -> dict:
    """params with every LoRA that is a fixed weight delta folded into its weight, once: the
    attention weights', the routed experts' (where the params hold them), and with kind "lora"
    the dense FFNs'. What routes per token (the FFN adapters of the other kinds) stays in
    `params["adapters"]`. The inference engine serves with this, so a decoding step does not
    rebuild W + (alpha / r) A B."""
    a = cfg.adapter
    if a is None or "adapters" not in params:
        return params
    check_adapter_params(params["adapters"], cfg)
    layers, adapters = dict(params["layers"]), {}
    for layer, ad in params["adapters"].items():
        p, rest = dict(layers[layer]), dict(ad)
        if "attn" in rest:
            p["attn"] = adapted_attention(p["attn"], rest.pop("attn"), a)
        if "experts" in rest and "experts" in p["moe"]:  # offloaded experts are held elsewhere
            p["moe"] = {**p["moe"], "experts": adapted_experts(p["moe"]["experts"], rest.pop("experts"), a)}
        if "ffn" in rest and a.kind == "lora":
            lora = rest.pop("ffn")
            p["ffn"] = {**p["ffn"], **{FFN_WEIGHT[n]: _merged(p["ffn"][FFN_WEIGHT[n]], ab, a.scaling)
                                       for n, ab in lora.items()}}
        layers[layer], adapters[layer] = p, rest
    return {**params, "layers": layers, "adapters": adapters}


@lru_cache(maxsize=32)
def _adapter_shapes(cfg) -> dict:
    """{leaf path: shape} of the adapter parameters `init_adapters` makes for LMConfig `cfg`."""
    tree = jax.eval_shape(lambda k: init_adapters(k, cfg), jax.random.key(0))
    return {jax.tree_util.keystr(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(tree)}


def check_adapter_params(adapters, cfg) -> None:
    """A ValueError naming the leaf when `adapters` (params["adapters"]) holds a leaf that
    `init_adapters` does not make for `cfg` (e.g. a layer the model lacks) or one of another
    shape (another rank or width). Leaves may be missing: `fold_weight_lora` folds some into
    the weights."""
    if not isinstance(adapters, dict):
        raise ValueError(f"params['adapters'] must be a dict of layers, got {type(adapters).__name__}")
    expected = _adapter_shapes(cfg)
    for path, leaf in jax.tree_util.tree_leaves_with_path(adapters):
        name = jax.tree_util.keystr(path)
        if name not in expected:
            raise ValueError(f"params['adapters']{name} is not an adapter of this model (cfg.adapter: kind "
                             f"{cfg.adapter.kind!r}, layers {list(adapter_layers(cfg))})")
        if tuple(jnp.shape(leaf)) != expected[name]:
            raise ValueError(f"params['adapters']{name} has shape {tuple(jnp.shape(leaf))}, expected {expected[name]} "
                             f"(cfg.adapter rank {cfg.adapter.rank})")


def merge_lora(params: dict, cfg) -> dict:
    """The frozen params with plain LoRA folded into the weights (kind "lora" only): the
    adapted model as an ordinary model, without `params["adapters"]`."""
    a = cfg.adapter
    if a is None or "adapters" not in params:
        raise ValueError("merge_lora needs a model with adapters (cfg.adapter and params['adapters'])")
    if a.kind != "lora":
        raise ValueError(f"only plain LoRA merges into the weights; {a.kind!r} routes per token")
    return {k: v for k, v in fold_weight_lora(params, cfg).items() if k != "adapters"}


__all__ = ["FFN_TARGETS", "adapted_attention", "adapted_experts", "adapted_ffn_layer", "adapter_layers", "check_adapter",
           "check_adapter_params", "fold_weight_lora", "init_adapter_state", "init_adapters", "matrix_shape",
           "mean_adapter_loss", "merge_lora", "update_adapter_state"]
