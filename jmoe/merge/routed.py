"""What the merges into routed models share (`wemoe`, `twin_merging`): fine-tunes of one base
become a model whose dense FFNs carry the fine-tunes' task-specific weights as the experts of
an adapter (`jmoe.adapters`), mixed per token by a router per layer, and only the routers are
trained, on a little data of the tasks.

  check_inputs    the models, their shapes and the data, each problem one MergeError
  upscale         the merged model with each dense FFN's adapter filled from the fine-tunes
  train_routers   Adam on the routers only, jit-compiled once
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jmoe.adapters import AdapterConfig, init_adapters
from jmoe.adapters.base import ffn_shapes
from jmoe.adapters.config import FFN_TARGETS, FFN_WEIGHT
from jmoe.merge.tree import MergeError


def check_inputs(method: str, cfg, base: dict, models: Sequence[dict], batches, steps: int, lr: float) -> tuple[int, ...]:
    """The dense layers of LMConfig `cfg` (the ones to upscale), after checking the models
    (same tree as the base, no adapters, the shapes `cfg` says), the batches (one non-empty
    sequence of (tokens, mask) pairs per model, tokens in the vocabulary) and the training
    settings."""
    from jmoe.merge.entropy_merging import check_inputs as check_learning, check_token_batches

    if cfg.adapter is not None:
        raise MergeError(f"{method}: the models carry {cfg.adapter.kind} adapters; merge models without adapters")
    check_learning(method, base, models, batches, steps, lr)
    check_lm_params(method, cfg, base)
    check_token_batches(method, batches, cfg.vocab_size)
    dense = tuple(i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i))
    if not dense:
        raise MergeError(f"{method} upscales dense FFN layers, and this model has none (every layer is an MoE layer)")
    return dense


def check_lm_params(method: str, cfg, params: dict, name: str = "base") -> None:
    """MergeError naming the leaf where `params` is not the tree of LMConfig `cfg`."""
    from jmoe.nn import init_lm

    want = jax.eval_shape(lambda: init_lm(jax.random.key(0), cfg))
    want_leaves = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(want)}
    got_leaves = {jax.tree_util.keystr(p): jnp.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    for path in sorted(set(want_leaves) | set(got_leaves)):
        if path not in got_leaves:
            raise MergeError(f"{method}: {name}{path} is missing for cfg (the model's LMConfig)")
        if path not in want_leaves:
            raise MergeError(f"{method}: {name}{path} is not a parameter of cfg (the model's LMConfig)")
        if tuple(got_leaves[path]) != tuple(want_leaves[path]):
            raise MergeError(f"{method}: {name}{path} has shape {tuple(got_leaves[path])}, cfg says "
                             f"{tuple(want_leaves[path])}")


def upscale(method: str, cfg, shared: dict, ffn_base: dict, adapter: dict, experts: Callable, seed: int = 0):
    """(LMConfig with the adapter, params): `shared` (the merged tree) whose dense FFNs take
    their weights from `ffn_base` (a tree like it) and an adapter `AdapterConfig(**adapter)`
    on every dense layer and FFN projection, freshly initialised, with each projection's
    experts replaced by experts(layer name, projection, weight name)."""
    dense = tuple(i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i))
    try:
        acfg = AdapterConfig(layers=dense, ffn_targets=FFN_TARGETS, **adapter)
        wcfg = dataclasses.replace(cfg, adapter=acfg)
    except ValueError as e:
        raise MergeError(f"{method}: {e}") from None
    params = dict(shared)
    adapters = init_adapters(jax.random.key(seed), wcfg)
    layers = dict(params["layers"])
    for i in dense:
        name = str(i)
        layers[name] = {**layers[name], "ffn": ffn_base["layers"][name]["ffn"]}
        ffn = dict(adapters[name]["ffn"])
        for proj in ffn_shapes(cfg.d_model, cfg.d_ff, cfg.activation, FFN_TARGETS):
            ffn[proj] = experts(name, proj, FFN_WEIGHT[proj])
        adapters[name] = {**adapters[name], "ffn": ffn}
    return wcfg, {**params, "layers": layers, "adapters": adapters}


def with_routers(params: dict, routers: dict) -> dict:
    """params with each adapted layer's router replaced from {layer: router}."""
    return {**params, "adapters": {n: {**a, "ffn": {**a["ffn"], "router": routers[n]}}
                                   for n, a in params["adapters"].items()}}


def train_routers(params: dict, loss: Callable[[dict, Any, int], jax.Array], batches: Sequence[Sequence[Any]], *,
                  steps: int, lr: float, log: Callable[[int, float], None] | None = None) -> dict:
    """params with the routers trained by Adam(lr) for `steps` steps on
    sum over tasks t of loss(params, batch of task t, t); step s uses batch s mod len of each
    task's. Everything else stays as it is. log(step, loss) is called every step."""
    from jmoe.merge.entropy_merging import fit

    routers = {n: a["ffn"]["router"] for n, a in params["adapters"].items()}
    routers = fit(routers, lambda r, step_batches: sum(loss(with_routers(params, r), b, t)
                                                       for t, b in enumerate(step_batches)),
                  batches, steps=steps, lr=lr, log=log)
    return with_routers(params, routers)


def stacked_deltas(models: Sequence[dict], ref: dict, layer: str, weight: str) -> jax.Array:
    """[T, ...] each model's FFN weight minus ref's (float32), of one layer."""
    w0 = jnp.asarray(ref["layers"][layer]["ffn"][weight], jnp.float32)
    return jnp.stack([jnp.asarray(m["layers"][layer]["ffn"][weight], jnp.float32) - w0 for m in models])
