"""WEMoE (Tang et al., ICML 2024; reference code tanganke/fusion_bench, `fusion_bench/method/we_moe`):
fine-tunes of one base merged into a model whose FFNs mix the task vectors per token.

  1. Everything is merged by task arithmetic with scale `init_lambda` (attention, norms,
     embeddings: the "remaining layers" of the reference).
  2. Every dense FFN is upscaled: it keeps the base's (pretrained) weights and takes the
     fine-tunes' FFN task vectors as experts, mixed by a router per layer (the adapter kind
     `wemoe`, `jmoe.adapters.wemoe`), which starts at `init_lambda` for every task vector, so
     the model starts as the task-arithmetic merge.
  3. Only the routers are trained, on unlabeled inputs of the tasks: Adam (lr 1e-4, the
     reference's) minimising the summed prediction entropy of one batch per task per step
     (AdaMerging's objective, `jmoe.merge.bench.entropy_objective`), jit-compiled once. As in
     the reference, a batch trains with its router outputs averaged (`batch_reduce`: one
     merged FFN per batch); the model returned routes every token on its own.

The result is a model with a different architecture (LMConfig.adapter is set), so WEMoE is a
function of models and data rather than a row of the pytree method table, and it cannot run
out of core through `jmoe merge`: its routers learn from the merged model's predictions.
MoE layers of the base are merged by task arithmetic and not upscaled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from jmoe.adapters import AdapterConfig, init_adapters
from jmoe.adapters.base import ffn_shapes
from jmoe.adapters.config import FFN_TARGETS, FFN_WEIGHT
from jmoe.merge.tree import MergeError, check_compatible, check_models


def _check_batches(batches, n: int, method: str) -> None:
    if not isinstance(batches, (list, tuple)) or len(batches) != n or not all(len(b) for b in batches):
        got = f"a {type(batches).__name__}" + (f" of {len(batches)}" if isinstance(batches, (list, tuple)) else "")
        raise MergeError(f"{method} needs batches: one non-empty sequence of unlabeled batches per model ({n}), got {got}")


def wemoe(cfg, base: dict, models: Sequence[dict], batches: Sequence[Sequence[Any]], *, state: dict | None = None,
          init_lambda: float = 0.3, router_hidden_layers: int = 2, steps: int = 1000, lr: float = 1e-4, seed: int = 0,
          log: Callable[[int, float], None] | None = None) -> tuple[Any, dict]:
    """WEMoE of the fine-tunes `models` of `base` (LM params of LMConfig `cfg`; see the module
    docstring). batches: one sequence of unlabeled (tokens [B, S], mask [B, S]) batches per
    model; step s uses batch s mod len of each. log(step, loss) is called every step.
    Returns (the upscaled model's LMConfig, its params)."""
    from jmoe.merge.bench import entropy_objective
    from jmoe.merge.methods import task_arithmetic

    check_models(models)
    if cfg.adapter is not None:
        raise MergeError(f"wemoe: the models carry {cfg.adapter.kind} adapters; merge models without adapters")
    check_compatible(base, models, [f"models[{i}]" for i in range(len(models))])
    _check_batches(batches, len(models), "wemoe")
    if steps < 0 or lr <= 0:
        raise MergeError(f"wemoe: steps={steps} must be >= 0 and lr={lr} > 0")
    dense = tuple(i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i))
    if not dense:
        raise MergeError("wemoe upscales dense FFN layers, and this model has none (every layer is an MoE layer)")
    try:
        acfg = AdapterConfig(kind="wemoe", num_experts=len(models), layers=dense, ffn_targets=FFN_TARGETS,
                             options={"router_hidden_layers": router_hidden_layers, "init_lambda": init_lambda})
    except ValueError as e:
        raise MergeError(f"wemoe: {e}") from None
    wcfg = dataclasses.replace(cfg, adapter=acfg)

    params = dict(task_arithmetic(base, list(models), lam=init_lambda))
    adapters = init_adapters(jax.random.key(seed), wcfg)
    layers = dict(params["layers"])
    projections = ffn_shapes(cfg.d_model, cfg.d_ff, cfg.activation, FFN_TARGETS)
    for i in dense:
        name = str(i)
        b_ffn = base["layers"][name]["ffn"]
        layers[name] = {**layers[name], "ffn": b_ffn}
        ffn = dict(adapters[name]["ffn"])
        for proj in projections:
            w = FFN_WEIGHT[proj]
            ffn[proj] = jnp.stack([jnp.asarray(m["layers"][name]["ffn"][w], jnp.float32)
                                   - jnp.asarray(b_ffn[w], jnp.float32) for m in models]).astype(b_ffn[w].dtype)
        adapters[name] = {**adapters[name], "ffn": ffn}
    params["layers"] = layers

    train_cfg = wcfg.replace(adapter=acfg.replace(options=dataclasses.replace(acfg.options, batch_reduce=True)))
    objective = entropy_objective(train_cfg, state)
    routers = {n: a["ffn"]["router"] for n, a in adapters.items()}

    def with_routers(r):
        return {**params, "adapters": {n: {**a, "ffn": {**a["ffn"], "router": r[n]}} for n, a in adapters.items()}}

    opt = optax.adam(lr)
    opt_state = opt.init(routers)

    @jax.jit
    def step(r, opt_state, step_batches):
        loss, grad = jax.value_and_grad(lambda r: sum(objective(with_routers(r), b) for b in step_batches))(r)
        updates, opt_state = opt.update(grad, opt_state, r)
        return optax.apply_updates(r, updates), opt_state, loss

    for s in range(steps):
        routers, opt_state, loss = step(routers, opt_state, [b[s % len(b)] for b in batches])
        if log is not None:
            log(s, float(loss))
    return wcfg, with_routers(routers)
