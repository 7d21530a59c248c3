"""`jmoe unlearn`: a run made to forget one evaluation task, written as a new run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jmoe.editing.uoe import METHODS, SCOPES, unlearn
from jmoe.nn.transformer import LMConfig


def editable_run(ckpt: str | Path, out: str | Path, doing: str) -> tuple[Path, LMConfig]:
    """(the output directory, the model config of run `ckpt`) once both are usable for an edit
    written as a new run: `out` absent or empty, `ckpt` a run whose experts are float weights
    of the model itself (no quantization, no adapters). `doing` names the edit in the errors
    ("unlearn in": "unlearn in its source run instead"). Reads only the configs."""
    from jmoe.merge.staging import check_output_dir
    from jmoe.train import rundir

    out = check_output_dir(out)
    cfg, _, _ = rundir.read_config(ckpt)
    if "quantization" in rundir.read_run_config(ckpt):
        raise ValueError(f"{ckpt} has quantized experts; {doing} its source run instead")
    if cfg.adapter is not None:
        raise ValueError(f"{ckpt} fine-tunes adapters; merge them into the model first (jmoe merge-lora)")
    return out, cfg


def unlearn_run(ckpt: str | Path, out: str | Path, *, forget: str, retain: str | None = None, method: str = "ga",
                scope: str = "expert", steps: int = 50, lr: float = 1e-4, alpha: float = 1.0, retain_weight: float = 1.0,
                npo_beta: float = 0.1, batches: int = 8, step: int | None = None, seed: int = 0,
                log: Callable[[str], None] = print) -> dict:
    """Unlearn the evaluation task `forget` from run `ckpt` (`jmoe.editing.unlearn`, on
    `batches` training windows of the task's text in the run's batch shape) and write the
    result as run `out` with a report: the target expert, and the loss on the forget and
    retain tasks' validation text before and after. retain: task names, comma-separated
    (gdiff's retain data). Everything is checked before the run's weights are read."""
    from jmoe import evals
    from jmoe.data import eval_batches, load_corpus
    from jmoe.data.batches import train_batch
    from jmoe.evals.mixture import mix_spec
    from jmoe.merge.staging import staged_dir
    from jmoe.train import rundir
    from jmoe.train.trainer import evaluate

    if method not in METHODS:
        raise ValueError(f"--method {method!r} must be one of {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise ValueError(f"--scope {scope!r} must be one of {', '.join(SCOPES)}")
    if method == "gdiff" and not retain:
        raise ValueError("--method gdiff needs --retain (tasks whose text to keep)")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"--batches {batches!r} must be an integer >= 1")
    forget_task = evals.resolve_tasks(forget)
    if len(forget_task) != 1:
        raise ValueError(f"--forget names one task, got {forget!r}")
    retain_tasks = evals.resolve_tasks(retain) if retain else []
    if forget_task[0].name in {t.name for t in retain_tasks}:
        raise ValueError(f"--retain names the forget task {forget_task[0].name!r}")
    out, cfg = editable_run(ckpt, out, "unlearn in")
    if scope == "expert" and cfg.moe is None:
        raise ValueError(f"{ckpt} is a dense model: there is no expert to unlearn in (use --scope all)")

    t0 = time.perf_counter()
    cfg, tc, params, router_state, saved, at = rundir.load_run(ckpt, step)
    state = router_state or None
    fc = load_corpus(mix_spec(forget_task[0].name))
    f_batches = [train_batch(fc.train, seed, i, tc.batch_size, tc.seq_len) for i in range(batches)]
    rc = load_corpus(mix_spec(",".join(t.name for t in retain_tasks))) if retain_tasks else None
    r_batches = [train_batch(rc.train, seed + 1, i, tc.batch_size, tc.seq_len) for i in range(batches)] if rc else None
    vals = {"forget": eval_batches(fc.val, tc.eval_batches, tc.batch_size, tc.seq_len)}
    if rc is not None:
        vals["retain"] = eval_batches(rc.val, tc.eval_batches, tc.batch_size, tc.seq_len)
    before = {k: evaluate(params, router_state, cfg, v)["val_loss"] for k, v in vals.items()}
    log(f"unlearning {forget_task[0].name} ({method}, scope {scope}, {steps} steps)")
    new, info = unlearn(cfg, params, f_batches, r_batches, scope=scope, method=method, alpha=alpha,
                        retain_weight=retain_weight, npo_beta=npo_beta, steps=steps, lr=lr, state=state,
                        log=lambda s, loss: log(f"   step {s + 1}/{steps} loss {loss:.4f}")
                        if (s + 1) % max(1, steps // 10) == 0 else None)
    after = {k: evaluate(new, router_state, cfg, v)["val_loss"] for k, v in vals.items()}
    report = {"source": str(Path(ckpt).absolute()), "step": at, "forget": forget_task[0].name,
              "retain": [t.name for t in retain_tasks], "lr": lr, "steps": steps, "alpha": alpha, **info,
              "val_loss_before": before, "val_loss_after": after}
    if "layer" in info:
        log(f"target: expert {info['expert']} of layer {info['layer']} (affinity "
            f"{np.asarray(info['affinity'])[cfg.moe_layers.index(info['layer']), info['expert']]:.3f})")
    with staged_dir(out) as tmp:
        rundir.save_model_run(tmp, cfg, tc, jax.tree.map(np.asarray, new), router_state, at, saved.get("data", {}),
                              meta={"unlearned_from": report["source"]},
                              unlearned_from={k: report[k] for k in ("source", "step", "forget", "method", "scope")})
        report["wall_s"] = time.perf_counter() - t0
        rundir.write_report(tmp, report)
    log("validation loss " + ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in before) + f"; wrote {out}")
    return report
