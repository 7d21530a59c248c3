"""Upcycling dense models into MoE models.

upcycle: sparse upcycling (Komatsuzaki et al., 2022): every dense FFN becomes an MoE layer
  whose experts are copies of it (optionally with multiplicative noise), under a new router.
  With renormalised top-k weights the upcycled model computes exactly what the dense one did
  until training moves the copies apart.
partition: Union of Experts' MLP experts (Yang et al., 2025): every dense FFN becomes an MoE
  layer whose E experts are slices of it (hidden units [e f/E, (e+1) f/E): columns of the gate
  and up projections, rows of the down projection), so that the experts together are the
  FFN; each selected slice counts once, as in the reference.
bam: Branch-Attend-Mix style (Zhang et al., 2024): several dense fine-tunes of one seed model
  become one MoE model whose experts are their FFNs; every other weight (attention, norms,
  embeddings) is the average of the fine-tunes (`average_trees`). BAM's soft mixture of
  attention experts, the fine-tunes' attention kept as experts, is built by `jmoe moe-build`
  (`attention_experts`, see `jmoe.merge.moe_build` and `jmoe.nn.attention_experts`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jmoe.checks import check_key, is_int
from jmoe.config import MoEConfig
from jmoe.layer import init_moe
from jmoe.nn.transformer import LMConfig


def moe_config_from_dense(cfg: LMConfig, num_experts: int, top_k: int, **kw) -> MoEConfig:
    """The MoE config of experts shaped like the dense FFN of `cfg` (renormalised top-k unless
    `kw` picks another router)."""
    if kw.get("router", "topk") == "topk":  # renormalised top-k, as the models it starts from
        kw.setdefault("router_options", dict(renormalize=True))
    return MoEConfig(num_experts=num_experts, top_k=top_k, d_model=cfg.d_model, d_ff=cfg.d_ff,
                     activation=cfg.activation, **kw)


def check_layers(layers: Sequence[int] | None, cfg: LMConfig) -> list[int]:
    """The sorted layer indices to turn into MoE layers (default: all); a ValueError naming
    `layers` for an index the model lacks or a repeated one."""
    if layers is None:
        return list(range(cfg.n_layers))
    bad = [i for i in layers if not is_int(i) or not 0 <= i < cfg.n_layers]
    if bad:
        raise ValueError(f"layers={list(layers)}: {bad[0]!r} is not a layer of the {cfg.n_layers}-layer model")
    out = sorted(int(i) for i in layers)
    if len(set(out)) != len(out):
        raise ValueError(f"layers={list(layers)} repeats a layer")
    return out


def average_trees(trees: Sequence) -> dict:
    """The leaf-wise mean of trees of equal structure, computed in float32 and returned in the
    first tree's dtypes."""
    return jax.tree.map(lambda *xs: (sum(jnp.asarray(x, jnp.float32) for x in xs) / len(xs)).astype(
        jnp.asarray(xs[0]).dtype), *trees)


def upcycle(params: dict, cfg: LMConfig, *, num_experts: int, top_k: int, key: jax.Array, noise: float = 0.0,
            layers: Sequence[int] | None = None, **moe_options) -> tuple[dict, LMConfig]:
    """Turn the dense FFNs of `layers` (default: all) into MoE layers of copies."""
    if cfg.moe is not None:
        raise ValueError("upcycle takes a dense model (cfg.moe is None)")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    check_key(key)
    layers = check_layers(layers, cfg)
    moe_cfg = moe_config_from_dense(cfg, num_experts, top_k, **moe_options)
    new = dict(params)
    new["layers"] = dict(params["layers"])
    keys = jax.random.split(key, len(layers) * 2)
    for n, i in enumerate(layers):
        layer = dict(params["layers"][str(i)])
        ffn = layer.pop("ffn")
        experts = {k: jnp.broadcast_to(v, (num_experts,) + v.shape) for k, v in ffn.items()}
        if noise:
            experts = {k: v * (1 + noise * jax.random.normal(jax.random.fold_in(keys[2 * n], j), v.shape, v.dtype))
                       for j, (k, v) in enumerate(experts.items())}
        router = init_moe(keys[2 * n + 1], moe_cfg)["router"]
        layer["moe"] = {"router": router, "experts": {k: jnp.asarray(v) for k, v in experts.items()}}
        new["layers"][str(i)] = layer
    dense = tuple(i for i in range(cfg.n_layers) if i not in layers)
    return new, cfg.replace(moe=moe_cfg, moe_every=1, dense_layers=dense)


def partition(params: dict, cfg: LMConfig, *, num_experts: int, top_k: int,
              layers: Sequence[int] | None = None) -> tuple[dict, LMConfig]:
    """Turn the dense FFNs of `layers` (default: all) into MoE layers of their E slices
    (module docstring). The router is `grouped_softmax` with one group, renormalised top-k
    weights times route_scale = top_k, and zero weights: every slice a token selects counts
    once, so with top_k = E each layer computes its dense FFN exactly (tested), and with fewer
    the sum of k slices until training moves the router."""
    if cfg.moe is not None:
        raise ValueError("partition takes a dense model (cfg.moe is None)")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    if cfg.d_ff % num_experts:
        raise ValueError(f"num_experts={num_experts} must divide the FFN width d_ff={cfg.d_ff}")
    layers = check_layers(layers, cfg)
    f = cfg.d_ff // num_experts
    moe_cfg = MoEConfig(num_experts=num_experts, top_k=top_k, d_model=cfg.d_model, d_ff=f, activation=cfg.activation,
                        router="grouped_softmax", router_options=dict(renormalize=True, route_scale=float(top_k)))
    new = dict(params)
    new["layers"] = dict(params["layers"])
    for i in layers:
        layer = dict(params["layers"][str(i)])
        ffn = layer.pop("ffn")
        experts = {}
        for name, w in ffn.items():
            w = jnp.asarray(w)
            if name == "w_down":  # [f_dense, d] -> [E, f, d]
                experts[name] = w.reshape(num_experts, f, w.shape[-1])
            else:  # [d, f_dense] -> [E, d, f]
                experts[name] = jnp.moveaxis(w.reshape(w.shape[0], num_experts, f), 1, 0)
        router = {"w": jnp.zeros((cfg.d_model, num_experts), moe_cfg.param_dtype)}
        layer["moe"] = {"router": router, "experts": experts}
        new["layers"][str(i)] = layer
    dense = tuple(i for i in range(cfg.n_layers) if i not in layers)
    return new, cfg.replace(moe=moe_cfg, moe_every=1, dense_layers=dense)


def bam(models: Sequence[dict], cfg: LMConfig, *, top_k: int, key: jax.Array, layers: Sequence[int] | None = None,
        **moe_options) -> tuple[dict, LMConfig]:
    """MoE from dense fine-tunes: expert e of each layer is fine-tune e's FFN; the other
    weights are averaged."""
    if cfg.moe is not None:
        raise ValueError("bam takes dense models (cfg.moe is None)")
    n = len(models)
    if n < 2:
        raise ValueError("bam needs at least 2 dense models")
    structure = jax.tree.structure(models[0])
    for i, m in enumerate(models[1:], 1):
        if jax.tree.structure(m) != structure:
            raise ValueError(f"models[{i}] has a different tree than models[0]")
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(models[0]), jax.tree.leaves(m)):
            if jnp.shape(a) != jnp.shape(b):
                raise ValueError(f"models[{i}]{jax.tree_util.keystr(path)} has shape {jnp.shape(b)}, "
                                 f"models[0]'s has {jnp.shape(a)}")
    check_key(key)
    layers = check_layers(layers, cfg)
    averaged = average_trees(models)
    moe_cfg = moe_config_from_dense(cfg, n, top_k, **moe_options)
    keys = jax.random.split(key, len(layers))
    new = dict(averaged)
    new["layers"] = dict(averaged["layers"])
    for k_, i in zip(keys, layers):
        layer = dict(averaged["layers"][str(i)])
        layer.pop("ffn")
        experts = {name: jnp.stack([m["layers"][str(i)]["ffn"][name] for m in models]) for name in models[0]["layers"][str(i)]["ffn"]}
        layer["moe"] = {"router": init_moe(k_, moe_cfg)["router"], "experts": experts}
        new["layers"][str(i)] = layer
    dense = tuple(i for i in range(cfg.n_layers) if i not in layers)
    return new, cfg.replace(moe=moe_cfg, moe_every=1, dense_layers=dense)
