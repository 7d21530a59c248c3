"""`jmoe compress`: merge, prune or compress the experts of a trained run into a new run directory.

The new directory is a run like any other (config.json + an orbax checkpoint of the full train
state with a fresh optimizer), so `jmoe eval`, `jmoe generate` and `jmoe train --resume-from`
(recovery fine-tuning, optionally with `--distill-from` the original run) accept it. Next to it:
`report.json` (parameters and bytes before/after, validation loss before/after, the groups),
`routing_stats.npz` (the calibration statistics, reusable with `stats=`) and, for MC-SMoE,
`factors.safetensors` (the low-rank factors and the kept residual columns).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jmoe.checks import is_int
from jmoe.merge.experts.compress import check_low_rank, compress_experts, expert_gradients
from jmoe.merge.experts.registry import check_options, check_target_experts
from jmoe.merge.experts.stats import check_stats, collect_expert_inputs, collect_routing_stats, load_stats, save_stats
from jmoe.merge.staging import check_output_dir, staged_dir
from jmoe.nn.transformer import LMConfig, init_lm_state


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
                 sparsity: float | None = None, budget: float | None = None, importance: str | None = None,
                 router: str | None = None, align: str | None = None, calib_batches: int = 8,
                 calib_data: str | None = None, stats: str | Path | None = None, step: int | None = None,
                 seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Reduce the experts of the run in `ckpt` and write the result as a run in `out`.

    method: a row of `jmoe.merge.experts.registry.COMPRESS_METHODS`: msmoe | average | random
    (merge into groups, `router` "share" (default) or "merge"), prune (drop the least used
    experts), mcsmoe (msmoe, then low rank + sparse residual: `rank` with `sparsity` or a
    parameter `budget`, `importance` "magnitude" (default) or "sensitivity"). align: neuron
    alignment of msmoe and mcsmoe, "weight" (default), "activation" or "none". Options left
    None take the method's default; an option the method does not take is an error.
    target_experts: experts per MoE layer on average over layers. stats: routing statistics
    saved by an earlier compress (instead of collecting them).

    Every argument is checked against the run's config.json before the model is loaded
    (one-line ValueErrors), and `out` must not exist or be empty. The new run is written in
    a temporary sibling of `out` and renamed into place at the end: a failure leaves nothing
    behind. Returns the report (also written to out/report.json).
    """
    from jmoe.data import eval_batches, load_corpus, train_batch
    from jmoe.train import rundir
    from jmoe.train.trainer import evaluate

    spec = check_options(method, rank=rank, sparsity=sparsity, budget=budget, importance=importance, router=router,
                         align=align)
    if not is_int(calib_batches) or calib_batches < 1:
        raise ValueError(f"calib_batches={calib_batches!r} must be an integer >= 1")
    importance = (importance or "magnitude") if spec.low_rank else None
    router = (router or "share") if spec.merges else None
    align = ({None: "weight", "none": None}.get(align, align)) if spec.aligns else None
    out = check_output_dir(out)
    cfg, tc, _ = rundir.read_config(ckpt)
    source = str(ckpt)
    if "quantization" in rundir.read_run_config(ckpt):
        raise ValueError(f"{source} has quantized experts; compress its source run instead")
    if cfg.moe is None:
        raise ValueError(f"{ckpt} is a dense model: there are no experts to reduce")
    check_target_experts(cfg, target_experts, source)
    if spec.check is not None:
        spec.check(cfg, target_experts, source)
    if spec.low_rank:
        check_low_rank(cfg, rank, budget, source)
    routing = None
    if stats is not None:
        routing = load_stats(stats)
        check_stats(routing, cfg, f"the routing statistics {str(stats)!r}")
    if calib_data is not None and not Path(calib_data).exists():
        raise ValueError(f"calibration data {str(calib_data)!r} does not exist")

    t0 = time.perf_counter()
    cfg, tc, params, router_state, saved, step = rundir.load_run(ckpt, step)
    params = jax.tree.map(np.asarray, params)
    corpus = load_corpus(calib_data if calib_data is not None else tc.data)
    calib = [train_batch(corpus.train, seed + 7919, i, tc.batch_size, tc.seq_len) for i in range(calib_batches)]
    if routing is not None:
        log(f"routing statistics from {stats}")
    else:
        log(f"collecting routing statistics on {calib_batches} calibration batches of {corpus.source}")
        routing = collect_routing_stats(params, cfg, calib, router_state=router_state)

    log(f"{method}: about {target_experts:g} experts per MoE layer (from {cfg.moe.num_experts})")
    factors = None
    inputs = None
    if spec.merges and align == "activation":
        inputs = collect_expert_inputs(params, cfg, calib, router_state=router_state)
    new, new_cfg, mapping, report = spec.reduce(params, cfg, routing, target_experts, align=align, router=router,
                                                calib=inputs, seed=seed)
    experts_before, experts_after = _expert_params(params, cfg), _expert_params(new, new_cfg)
    if spec.low_rank:
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
        "router": router, "align": align,
        "experts_per_layer": {str(i): new_cfg.moe_for(i).num_experts for i in new_cfg.moe_layers},
        "params_before": total_before, "params_after": int(total_after),
        "expert_params_before": experts_before, "expert_params_after": int(experts_after),
        "bytes_before": total_before * itemsize, "bytes_after": int(total_after) * itemsize,
        "memory_ratio": total_after / total_before,
        "val_loss_before": ev_before["val_loss"], "val_loss_after": ev_after["val_loss"],
        "calibration": {"batches": calib_batches, "data": corpus.source, "tokens": int(routing["tokens"])},
        **report,
    }

    with staged_dir(out) as tmp:
        save_stats(routing, tmp / "routing_stats.npz")
        rundir.save_model_run(tmp, new_cfg, tc, new, new_state, step, saved.get("data", {}),
                              meta={"compressed_from": report["source"]},
                              compressed_from={k: report[k] for k in ("source", "step", "method")})
        if factors is not None:
            _save_factors(factors, tmp / "factors.safetensors")
        report["wall_s"] = time.perf_counter() - t0
        rundir.write_report(tmp, report)
    log(f"parameters {total_before:,} -> {int(total_after):,} ({report['memory_ratio']:.1%}); "
        f"validation loss {ev_before['val_loss']:.4f} -> {ev_after['val_loss']:.4f}; wrote {out}")
    return report


def _save_factors(factors: dict, path: Path) -> None:
    """The MC-SMoE factors and kept residual columns as one safetensors file."""
    from jmoe.io.safetensors import save_safetensors

    flat = {}
    for l, names in factors.items():
        for n, f in names.items():
            flat[f"layers.{l}.{n}.L"], flat[f"layers.{l}.{n}.R"] = f["L"], f["R"]
            for e, (cols, S) in enumerate(zip(f["cols"], f["S"])):
                flat[f"layers.{l}.{n}.{e}.cols"] = cols.astype(np.int32)
                flat[f"layers.{l}.{n}.{e}.S"] = S
    save_safetensors(flat, path)
