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

from jmoe.merge.routed import check_inputs, stacked_deltas, train_routers, upscale


def wemoe(cfg, base: dict, models: Sequence[dict], batches: Sequence[Sequence[Any]], *, state: dict | None = None,
          init_lambda: float = 0.3, router_hidden_layers: int = 2, steps: int = 1000, lr: float = 1e-4, seed: int = 0,
          log: Callable[[int, float], None] | None = None) -> tuple[Any, dict]:
    """WEMoE of the fine-tunes `models` of `base` (LM params of LMConfig `cfg`; see the module
    docstring). batches: one sequence of unlabeled (tokens [B, S], mask [B, S]) batches per
    model; step s uses batch s mod len of each. log(step, loss) is called every step.
    Returns (the upscaled model's LMConfig, its params)."""
    from jmoe.merge.bench import entropy_objective
    from jmoe.merge.methods import task_arithmetic

    check_inputs("wemoe", cfg, base, models, batches, steps, lr)
    shared = task_arithmetic(base, list(models), lam=init_lambda)
    opts = {"router_hidden_layers": router_hidden_layers, "init_lambda": init_lambda}
    wcfg, params = upscale("wemoe", cfg, shared, base, dict(kind="wemoe", num_experts=len(models), rank=1, options=opts),
                           lambda layer, proj, w: stacked_deltas(models, base, layer, w).astype(
                               base["layers"][layer]["ffn"][w].dtype), seed)
    a = wcfg.adapter
    objective = entropy_objective(wcfg.replace(adapter=a.replace(options=dataclasses.replace(a.options, batch_reduce=True))),
                                  state)
    return wcfg, train_routers(params, lambda p, b, t: objective(p, b), batches, steps=steps, lr=lr, log=log)
