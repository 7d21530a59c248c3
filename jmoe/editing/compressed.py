"""Compressed experts for a trained model: every MoE layer switched to the "compressed" dispatch
(`jmoe.dispatch.compressed`), its experts given their vectors (all ones), ready to fine-tune.

With ones, the converted model computes only each token's first k - n experts (by routing
weight) with their own weights: the compressed experts start as a plain drop of the n lowest
ones and learn to stand in for them while the model is fine-tuned (`jmoe train --resume-from`;
the reference trains every parameter).

>>> cfg2, params2 = compress_experts(cfg, params, num_compressed=1)    # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.experts import dispatch_vectors
from jmoe.nn.transformer import LMConfig


def compressed_config(cfg: LMConfig, num_compressed: int = 1) -> LMConfig:
    """The `LMConfig` with compressed experts (n = num_compressed) in every MoE layer.
    ValueError naming the argument or the layer that cannot take them."""
    if isinstance(num_compressed, bool) or not isinstance(num_compressed, (int, np.integer)) or num_compressed < 1:
        raise ValueError(f"num_compressed={num_compressed!r} must be an integer >= 1")
    if cfg.moe is None or not cfg.moe_layers:
        raise ValueError("the model has no MoE layers: there are no experts to compress")
    for i in cfg.moe_layers:
        moe = cfg.moe_for(i)
        if moe.dispatch == "compressed":
            raise ValueError(f"MoE layer {i} already has compressed experts")
        if moe.top_k <= num_compressed:
            raise ValueError(f"num_compressed={num_compressed} must be below MoE layer {i}'s top_k={moe.top_k}: at "
                             "least one expert per token is computed in full")
    return cfg.with_moe(dispatch="compressed", dispatch_options={"num_compressed": int(num_compressed)})


def compress_experts(cfg: LMConfig, params: dict, num_compressed: int = 1) -> tuple:
    """(`LMConfig`, params) with compressed experts in every MoE layer: `compressed_config`,
    and each layer's experts given their vectors (ones).

    Args:
      cfg: the model's `LMConfig`.
      params: its parameters (stacked experts).
      num_compressed: n, each token's lowest-ranked experts replaced (1 <= n < top_k of
        every MoE layer).
    """
    new_cfg = compressed_config(cfg, num_compressed)
    layers = dict(params["layers"])
    for i in cfg.moe_layers:
        experts = dict(layers[str(i)]["moe"]["experts"])
        ref = experts["w_up"]
        for name, shape in dispatch_vectors(new_cfg.moe_for(i)).items():
            experts[name] = jnp.ones((ref.shape[0],) + shape, ref.dtype)
        layers[str(i)] = dict(layers[str(i)], moe=dict(layers[str(i)]["moe"], experts=experts))
    return new_cfg, dict(params, layers=layers)


def active_expert_fraction(cfg: LMConfig) -> float:
    """Share of a token's routed-expert parameters computed, over the MoE layers: (k - n) / k
    with compressed experts (their vectors are not counted), 1 without."""
    fractions = []
    for i in cfg.moe_layers:
        moe = cfg.moe_for(i)
        n = moe.dispatch_options.num_compressed if moe.dispatch == "compressed" else 0
        fractions.append((moe.top_k - n) / moe.top_k)
    return float(np.mean(fractions)) if fractions else 1.0


def compressed_run(ckpt: str | Path, out: str | Path, *, num_compressed: int = 1, step: int | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """Write run `ckpt` with compressed experts (`compress_experts`) as run `out`, which
    `jmoe train --resume-from out` fine-tunes and every command reads. Returns its report.
    Everything is checked before the run's weights are read."""
    from jmoe.editing.run import editable_run
    from jmoe.merge.staging import staged_dir
    from jmoe.train import rundir

    out, cfg = editable_run(ckpt, out, "compress the experts of")
    t0 = time.perf_counter()
    compressed_config(cfg, num_compressed)
    cfg, tc, params, router_state, saved, at = rundir.load_run(ckpt, step)
    new_cfg, params = compress_experts(cfg, params, num_compressed)
    report = {"source": str(Path(ckpt).absolute()), "step": at, "num_compressed": int(num_compressed),
              "active_expert_fraction": active_expert_fraction(new_cfg)}
    with staged_dir(out) as tmp:
        rundir.save_model_run(tmp, new_cfg, tc, jax.tree.map(np.asarray, params), router_state, at,
                              saved.get("data", {}), meta={"compressed_from": report["source"]},
                              compressed_from={k: report[k] for k in ("source", "step", "num_compressed")})
        report["wall_s"] = time.perf_counter() - t0
        rundir.write_report(tmp, report)
    log(f"compressed experts: {num_compressed} of each token's experts replaced by vectors "
        f"({report['active_expert_fraction']:.0%} of the routed-expert parameters active); wrote {out}")
    return report

