"""`jmoe compress`: merge, prune or compress the experts of a trained run into a new run directory.

The new directory is a run like any other (config.json + an orbax checkpoint of the full train
state with a fresh optimizer), so `jmoe eval`, `jmoe generate` and `jmoe train --resume-from`
(recovery fine-tuning, optionally with `--distill-from` the original run) accept it. Next to it:
`report.json` (parameters and bytes before/after, validation loss before/after, the groups),
`routing_stats.npz` (the calibration statistics, reusable with `stats=`) and, for MC-SMoE,
`factors.safetensors` (the low-rank factors and the kept residual columns).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

import jmoe
from jmoe.merge.experts.compress import compress_experts, expert_gradients
from jmoe.merge.experts.msmoe import merge_experts
from jmoe.merge.experts.prune import prune_experts
from jmoe.merge.experts.stats import collect_expert_inputs, collect_routing_stats, load_stats, save_stats
from jmoe.nn.transformer import LMConfig, init_lm_state

METHODS = ("msmoe", "mcsmoe", "average", "random", "prune")


def _expert_params(params: dict, cfg: LMConfig) -> int:
    return sum(int(np.prod(np.shape(v))) for i in cfg.moe_layers for v in params["layers"][str(i)]["moe"]["experts"].values())


def _total_params(params: dict) -> int:
    return sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(params))


def _carry_router_state(old: dict | None, cfg: LMConfig, mapping: dict) -> dict:
    """The new model's router state: unchanged where shapes agree, else gathered (pruning) or
    averaged per group (merged router columns) from the old one."""
    new = init_lm_state(cfg)
    if not old:
        return new
    for layer, s in new.items():
        prev = old.get(layer, {})
        out = dict(s)
        for k, v in s.items():
            p = prev.get(k)
            if p is None:
                continue
            p = np.asarray(p)
            if p.shape == np.shape(v):
                out[k] = p
            elif layer in mapping and p.ndim == 1:
                kind, m = mapping[layer]
                out[k] = p[m] if kind == "keep" else np.asarray([p[m == g].mean() for g in range(int(m.max()) + 1)])
            out[k] = np.asarray(out[k], np.asarray(v).dtype)
        new[layer] = out
    return new


def compress_run(ckpt: str | Path, out: str | Path, *, method: str, target_experts: float, rank: int | None = None,
                 sparsity: float | None = None, budget: float | None = None, importance: str = "magnitude",
                 router: str = "share", align: str | None = "weight", calib_batches: int = 8,
                 calib_data: str | None = None, stats: str | Path | None = None, step: int | None = None,
                 seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Reduce the experts of the run in `ckpt` and write the result as a run in `out`.

    method: msmoe | average | random (merge into groups, `router` "share" or "merge"),
    prune (drop the least used experts), mcsmoe (msmoe, then low rank + sparse residual:
    `rank` with `sparsity` or a parameter `budget`). target_experts: experts per MoE layer on
    average over layers. Returns the report (also written to out/report.json).
    """
    from jmoe.data import eval_batches, load_corpus, train_batch
    from jmoe.train.checkpoint import CheckpointStore
    from jmoe.train.metrics import atomic_write_text
    from jmoe.train.trainer import TrainError, evaluate, init_train_state, load_run, make_optimizer

    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {', '.join(METHODS)}")
    if method == "mcsmoe":
        if rank is None or (sparsity is None) == (budget is None):
            raise ValueError("method='mcsmoe' needs rank and exactly one of sparsity or budget")
    elif rank is not None or sparsity is not None or budget is not None:
        raise ValueError(f"rank, sparsity and budget belong to method='mcsmoe', not {method!r}")
    if calib_batches < 1:
        raise ValueError(f"calib_batches={calib_batches} must be >= 1")
    out = Path(out)
    if (out / "checkpoints").exists() or (out / "config.json").exists():
        raise TrainError(f"{out} already holds a run; choose another --out")
    t0 = time.perf_counter()
    cfg, tc, params, router_state, saved, step = load_run(ckpt, step)
    if cfg.moe is None:
        raise ValueError(f"{ckpt} is a dense model: there are no experts to reduce")
    params = jax.tree.map(np.asarray, params)
    corpus = load_corpus(calib_data if calib_data is not None else tc.data)
    calib = [train_batch(corpus.train, seed + 7919, i, tc.batch_size, tc.seq_len) for i in range(calib_batches)]
    if stats is not None:
        routing = load_stats(stats)
        log(f"routing statistics from {stats}")
    else:
        log(f"collecting routing statistics on {calib_batches} calibration batches of {corpus.source}")
        routing = collect_routing_stats(params, cfg, calib, router_state=router_state)
    out.mkdir(parents=True, exist_ok=True)
    save_stats(routing, out / "routing_stats.npz")

    log(f"{method}: about {target_experts:g} experts per MoE layer (from {cfg.moe.num_experts})")
    mapping: dict = {}
    factors = None
    report: dict = {}
    if method == "prune":
        new, new_cfg, kept = prune_experts(params, cfg, routing, target_experts)
        mapping = {l: ("keep", k) for l, k in kept.items()}
        report["kept"] = {l: k.tolist() for l, k in kept.items()}
    else:
        inputs = None
        if align == "activation":
            inputs = collect_expert_inputs(params, cfg, calib, router_state=router_state)
        new, new_cfg, groups = merge_experts(params, cfg, routing, target_experts,
                                             method="msmoe" if method == "mcsmoe" else method,
                                             align=align, router=router, calib=inputs, seed=seed)
        if router == "merge":
            mapping = {l: ("groups", g) for l, g in groups.items()}
        report["groups"] = {l: g.tolist() for l, g in groups.items()}
    experts_before, experts_after = _expert_params(params, cfg), _expert_params(new, new_cfg)
    if method == "mcsmoe":
        grads = None
        if importance == "sensitivity":
            log("gradients of the merged experts for sensitivity scores")
            grads = expert_gradients(new, new_cfg, calib[: max(1, calib_batches // 2)], router_state=None)
        new, factors, crep = compress_experts(new, new_cfg, rank=rank, sparsity=sparsity, budget=budget,
                                              importance=importance, grads=grads)
        report["compression"] = crep
        experts_after = crep["expert_params_after"]
    new_state = _carry_router_state(router_state, new_cfg, mapping)

    total_before = _total_params(params)
    total_after = _total_params(new) - _expert_params(new, new_cfg) + experts_after
    itemsize = np.dtype(cfg.param_dtype).itemsize
    val = eval_batches(corpus.val, tc.eval_batches, tc.batch_size, tc.seq_len)
    log("validation before and after")
    ev_before = evaluate(params, router_state, cfg, val)
    ev_after = evaluate(new, new_state or None, new_cfg, val)
    report = {
        "source": str(Path(ckpt).absolute()), "step": step, "method": method, "target_experts": target_experts,
        "router": router if method != "prune" else None, "align": align if method in ("msmoe", "mcsmoe") else None,
        "experts_per_layer": {str(i): new_cfg.moe_for(i).num_experts for i in new_cfg.moe_layers},
        "params_before": total_before, "params_after": int(total_after),
        "expert_params_before": experts_before, "expert_params_after": int(experts_after),
        "bytes_before": total_before * itemsize, "bytes_after": int(total_after) * itemsize,
        "memory_ratio": total_after / total_before,
        "val_loss_before": ev_before["val_loss"], "val_loss_after": ev_after["val_loss"],
        "calibration": {"batches": calib_batches, "data": corpus.source, "tokens": int(routing["tokens"])},
        **report,
    }

    tx, _ = make_optimizer(tc)
    state = jax.jit(lambda: init_train_state(new_cfg, tc, tx))()
    state = dict(state, params=jax.tree.map(jax.numpy.asarray, new), opt_state=tx.init(new))
    if new_state:
        state["router_state"] = jax.tree.map(jax.numpy.asarray, new_state)
    store = CheckpointStore(out / "checkpoints", keep=1)
    try:
        store.save(step, state, {"step": step, "data_position": step, "compressed_from": report["source"]})
    finally:
        store.close()
    run_config = {"model": new_cfg.to_dict(), "train": tc.to_dict(), "data": saved.get("data", {}),
                  "jmoe_version": jmoe.__version__, "compressed_from": {k: report[k] for k in ("source", "step", "method")}}
    atomic_write_text(out / "config.json", json.dumps(run_config, indent=1))
    if factors is not None:
        from jmoe.io.safetensors import save_safetensors

        flat = {}
        for l, names in factors.items():
            for n, f in names.items():
                flat[f"layers.{l}.{n}.L"], flat[f"layers.{l}.{n}.R"] = f["L"], f["R"]
                for e, (cols, S) in enumerate(zip(f["cols"], f["S"])):
                    flat[f"layers.{l}.{n}.{e}.cols"] = cols.astype(np.int32)
                    flat[f"layers.{l}.{n}.{e}.S"] = S
        save_safetensors(flat, out / "factors.safetensors")
    report["wall_s"] = time.perf_counter() - t0
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    log(f"parameters {total_before:,} -> {int(total_after):,} ({report['memory_ratio']:.1%}); "
        f"validation loss {ev_before['val_loss']:.4f} -> {ev_after['val_loss']:.4f}; wrote {out}")
    return report
