"""How long the learned merges of the merging benchmark take at a given size, on this machine.

A learned merge's time does not depend on what its models learned, so this runs each method
of `merging_benchmark.py` that trains something (AdaMerging task- and layer-wise, CONCRETE on
task arithmetic and on AdaMerging, WEMoE, Twin-Merging) with the benchmark's settings and
data (2 x 16 unlabeled inputs of each of the suite's eight tasks per step) on a randomly
initialised dense base of the preset and eight random "fine-tunes" of it (the base plus small
noise). Each method runs a few steps per phase; the time to its first step (setup and
compilation), the median time of a step and the projection to the paper's step count are
recorded, per seed (the seed draws the weights and the inputs). The issue's goal: every
learned method finishes in minutes on 2 CPU cores at the `small` size, read here as a projected
total of at most 10 minutes.

    python experiments/bench_learned_merges.py [--preset small] [--steps 6] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402
import merging_benchmark as mb  # noqa: E402

from jmoe import evals  # noqa: E402
from jmoe.evals.stats import summary  # noqa: E402
from jmoe.infer.load import Model  # noqa: E402
from jmoe.infer.tokenizer import ByteTokenizer  # noqa: E402
from jmoe.nn import init_lm, preset  # noqa: E402

LEARNED = ("adamerging_task", "adamerging_layer", "concrete_ta", "concrete_adamerging", "wemoe", "twin_merging")
GOAL_MINUTES = 10.0


def phases(method: str) -> list[tuple[str, str]]:
    """(name, key of its step count in the method's parameters) of each training phase."""
    if method == "concrete_adamerging":
        return [("mask", "steps"), ("adamerging", "adamerging_steps")]
    return [("train", "steps")]


def models(cfg, seed: int, n: int) -> tuple[Model, list[Model]]:
    """A random base and n random fine-tunes of it (each weight plus 1% of its scale in noise)."""
    params = init_lm(jax.random.key(seed), cfg)
    tok = ByteTokenizer()
    base = Model(cfg=cfg, params=params, state={}, tokenizer=tok, source="random base")
    fts = []
    for i in range(n):
        keys = iter(jax.random.split(jax.random.key(1000 * seed + i), len(jax.tree.leaves(params))))
        noisy = jax.tree.map(lambda w: w + 0.01 * w.std() * jax.random.normal(next(keys), w.shape, w.dtype), params)
        fts.append(Model(cfg=cfg, params=noisy, state={}, tokenizer=tok, source=f"random fine-tune {i}"))
    return base, fts


def time_method(method: str, base: Model, fts: list[Model], tasks, seed: int, steps: int) -> dict:
    """Run `method` for `steps` steps per phase; the times of its phases and the projection."""
    name, params = mb.METHODS[method]
    paper = {key: params[key] for _, key in phases(method)}
    original = dict(params)
    params.update({key: steps for key in paper})
    stamps = []
    t0 = time.perf_counter()
    try:
        mb.merged_model(method, base, fts, tasks, seed, log=lambda m: None,
                        step_log=lambda s, loss: stamps.append(time.perf_counter()))
    finally:
        params.clear()
        params.update(original)
    total = time.perf_counter() - t0
    out = {"paper_steps": paper, "timed_steps": steps, "seconds": total, "phases": {}}
    projected, start = 0.0, t0
    for i, (phase, key) in enumerate(phases(method)):
        ts = stamps[i * steps:(i + 1) * steps]
        first = ts[0] - start  # setup, compilation and the first step
        step = float(statistics.median(np.diff(ts))) if len(ts) > 1 else first
        out["phases"][phase] = {"first_s": first, "step_s": step}
        projected += first + (paper[key] - 1) * step
        start = ts[-1]
    out["projected_s"] = projected + (t0 + total - start)  # and what follows the last step
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=6, help="steps timed per phase (>= 2)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(LEARNED), choices=list(LEARNED))
    a = ap.parse_args(argv)
    if a.steps < 2:
        ap.error("--steps must be at least 2 (a step time is an interval between two steps)")
    cfg = preset(a.preset)["model"].replace(moe=None)  # the benchmark's dense base
    tasks = evals.resolve_tasks("all")
    per_seed = []
    for s in a.seeds:
        base, fts = models(cfg, s, len(tasks))
        row = {}
        for m in a.methods:
            row[m] = time_method(m, base, fts, tasks, s, a.steps)
            print(f"seed {s} {m}: first step {row[m]['phases']} projected {row[m]['projected_s'] / 60:.1f} min",
                  flush=True)
        per_seed.append(row)
    methods = {}
    for m in a.methods:
        minutes = [r[m]["projected_s"] / 60 for r in per_seed]
        stat = summary(minutes)
        methods[m] = {"projected_minutes": stat, "paper_steps": per_seed[0][m]["paper_steps"],
                      "step_s": {p: summary([r[m]["phases"][p]["step_s"] for r in per_seed]) for p in
                                 per_seed[0][m]["phases"]},
                      "goal_met": bool(stat["ci95"][1] <= GOAL_MINUTES)}
        print(f"{m}: {stat['mean']:.1f} min projected (95% CI {stat['ci95'][0]:.1f}..{stat['ci95'][1]:.1f}; "
              f"goal <= {GOAL_MINUTES:.0f}: {'met' if methods[m]['goal_met'] else 'not met'})", flush=True)
    payload = {"command": "python experiments/bench_learned_merges.py" + (f" --preset {a.preset}" if a.preset != "small"
                                                                         else ""),
               "preset": a.preset, "seeds": a.seeds, "timed_steps": a.steps, "goal_minutes": GOAL_MINUTES,
               "parameters": sum(int(np.prod(w.shape)) for w in jax.tree.leaves(init_lm(jax.random.key(0), cfg))),
               "machine": (f"{os.cpu_count()} CPU cores" if jax.default_backend() == "cpu"
                           else jax.devices()[0].device_kind), "code_commit": _zoo.git_commit(),
               "methods": methods, "per_seed": per_seed}
    path = _zoo.RESULTS / f"bench_learned_merges_{a.preset}.json"
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
