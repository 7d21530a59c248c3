"""Multi-task model merging of language models, judged as FusionBench judges merges of CLIP models.

The dense base of lora_experts.py (the `small` preset without MoE layers, or `tiny`'s with
--preset tiny), trained on the evaluation suite's text domains, is fine-tuned in full on each
task of the suite, one fine-tune per task: the five algorithmic tasks (the same runs as
moe_build.py's specialists) and the three text domains. The eight fine-tunes are then merged
into one model by each method, with its paper's defaults:

  average            the fine-tunes' weights averaged (linear)
  task_arithmetic    base + 0.3 * the summed task vectors (FusionBench's scaling factor)
  ties               TIES: top-20% of each task vector, sign election, disjoint mean, lambda 1
  tsvm               TSV-M: each task vector cut to its top 1/8 singular vectors, whitened, alpha 1
  adamerging_task    AdaMerging, one coefficient per task, learned by entropy minimisation
  adamerging_layer   AdaMerging, one coefficient per task and parameter tensor
                     (both: prior 0.3, Adam lr 1e-3, 500 steps, 2 x 16 unlabeled train inputs
                     per task per step: prompts without answers, text windows)
  concrete_ta        CONCRETE: a mask shared by the tasks, learned through a concrete relaxation
                     (temperature 0.5, Adam lr 1e-3) by entropy minimisation, on task arithmetic (0.3)
  concrete_adamerging  the same mask meta-learned through one step of layer-wise AdaMerging,
                     then layer-wise AdaMerging on the masked task vectors
                     (both at AdaMerging's budget of 500 entropy gradients: 500 mask steps,
                     or 250 meta-learning steps of two, then 500 AdaMerging steps)
  wemoe              WEMoE: task arithmetic (0.3) with every FFN upscaled into the task vectors
                     mixed per token by a router (two-layer, starting at 0.3), the routers
                     trained by entropy minimisation on the same inputs (Adam lr 1e-4, 1000 steps)
  twin_merging       Twin-Merging: task arithmetic (0.3) as the shared model, each fine-tune's FFNs
                     minus it at rank 8 as exclusive parts, mixed per token by softmax routers
                     trained to recognise the task of the same inputs (Adam lr 5e-4, 300 steps)

and scored on every task's test split (exact match, or bits per byte), against the base, each
task's own fine-tune ("individual", the upper bound of a merge) and one fine-tune on the
mixture of all eight tasks ("multitask"). A merge's normalised score on a task is its metric
over the individual fine-tune's (own / merged for bits per byte, where lower is better); the
table reports the mean over tasks. Claims, paired by seed (the issue's goals): TIES beats task
arithmetic; AdaMerging beats TIES; TSV-M beats task arithmetic; CONCRETE beats what it masks
(task arithmetic, layer-wise AdaMerging); WEMoE and Twin-Merging beat
TIES and layer-wise AdaMerging. Writes experiments/results/merging_benchmark_<preset>.{json,png}:
run with --preset tiny and --preset small, the results table also compares every method's
score from the two bases ("What Matters for Model Merging at Scale"). Runs and scores are
cached by configuration and code version, so a stopped run resumes (train in slices with
--train-only). A seed can also be measured on its own with --slice, which stores its scores in
slices/merging_benchmark_<preset>.seed<S>.json; the full run takes each seed from its slice
when the settings match, and records the code version each seed was measured with.

    python experiments/merging_benchmark.py --preset tiny
    python experiments/merging_benchmark.py --preset tiny --seeds 1 --slice   # one seed, stored
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402
import lora_experts  # noqa: E402
import moe_build  # noqa: E402

from jmoe import evals, merge  # noqa: E402
from jmoe.evals.mixture import mix_spec  # noqa: E402
from jmoe.infer.load import Model, open_model  # noqa: E402
from jmoe.merge import bench  # noqa: E402
from jmoe.nn import preset  # noqa: E402

from _harness import cached, code_version  # noqa: E402

ADAMERGING = dict(steps=500, lr=1e-3, prior=0.3)
WEMOE = dict(steps=1000, lr=1e-4, init_lambda=0.3, router_hidden_layers=2)
TWIN = dict(steps=300, lr=5e-4, lam=0.3, rank=8)
# CONCRETE at AdaMerging's budget of entropy gradients: 500 mask steps (Concrete Task
# Arithmetic), or 250 meta-learning steps of two passes each and then 500 AdaMerging steps
CONCRETE = dict(lr=1e-3, temperature=0.5, lam=0.3)
METHODS = {
    "average": ("linear", {}),
    "task_arithmetic": ("task_arithmetic", {"lam": 0.3}),
    "ties": ("ties", {"density": 0.2, "lam": 1.0}),
    "tsvm": ("tsvm", {"lam": 1.0}),
    "adamerging_task": ("adamerging", {"granularity": "task", **ADAMERGING}),
    "adamerging_layer": ("adamerging", {"granularity": "layer", **ADAMERGING}),
    "concrete_ta": ("concrete", {"adamerging": None, "steps": 500, **CONCRETE}),
    "concrete_adamerging": ("concrete", {"adamerging": "layer", "steps": 250, "adamerging_steps": 500,
                                         "adamerging_lr": 1e-3, **CONCRETE}),
    "wemoe": ("wemoe", WEMOE),
    "twin_merging": ("twin_merging", TWIN),
}
ROUTED = {"wemoe": merge.wemoe, "twin_merging": merge.twin_merging}  # models of their own architecture
UNLABELED = 32  # unlabeled inputs per task for AdaMerging (two batches of 16)


def merged_model(method: str, base: Model, fts: list[Model], tasks, seed: int, log, step_log=None) -> tuple[Model, dict]:
    """The merge of the fine-tunes by one of `METHODS`, with what it learned (AdaMerging's
    coefficients, the training loss before and after) and how long it took. step_log(step,
    loss) is called at every step of a learned method."""
    name, params = METHODS[method]
    t0 = time.perf_counter()
    info = {}
    cfg = base.cfg
    unlabeled = lambda: [bench.unlabeled_batches(t, base.tokenizer, n=UNLABELED, seed=seed) for t in tasks]
    losses = []

    def record(step, loss):
        losses.append(loss)
        if step_log is not None:
            step_log(step, loss)

    if name in ROUTED:
        cfg, params_out = ROUTED[name](base.cfg, base.params, [m.params for m in fts], unlabeled(), state=base.state,
                                       seed=seed, log=record, **params)
        info = {"loss_first": losses[0], "loss_last": losses[-1]} if losses else {}
    elif name == "adamerging":
        params_out, lam = merge.adamerging(base.params, [m.params for m in fts], unlabeled(),
                                           objective=bench.entropy_objective(base.cfg, base.state),
                                           log=record, return_lambdas=True, **params)
        info = {"entropy_first": losses[0], "entropy_last": losses[-1],
                "lambdas_mean_per_task": np.asarray(lam).reshape(-1, len(tasks)).mean(0).round(4).tolist()}
    elif name == "concrete":
        params_out, keep = merge.concrete(base.params, [m.params for m in fts], unlabeled(),
                                          objective=bench.entropy_objective(base.cfg, base.state), seed=seed,
                                          log=record, return_mask=True, **params)
        probs = np.concatenate([np.asarray(k).reshape(-1) for k in jax.tree.leaves(keep)])
        info = {"entropy_first": losses[0], "entropy_last": losses[-1],
                "kept_share": float(np.mean(probs > 0.5))} if losses else {}
    else:
        params_out = bench.merge_models(name, base.params, [m.params for m in fts], **params)
    if losses:  # the training curve, every tenth step, to judge convergence
        info["curve"] = [round(float(x), 5) for x in losses[::10]]
    info["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"   {method}: merged in {info['seconds']} s")
    return Model(cfg=cfg, params=params_out, state=base.state, tokenizer=base.tokenizer, source=method), info


SLICE_ROLE = ("one seed of the benchmark, stored to be joined with the other seeds by a full run: its scores back no "
              "claim on their own (the claims and their intervals are in results/merging_benchmark_<preset>.json)")


SLICES = Path(__file__).parent / "slices"  # measurements to be joined, kept apart from the results that back claims


def slice_path(preset_name: str, seed: int) -> Path:
    return SLICES / f"merging_benchmark_{preset_name}.seed{seed}.json"


def write_slice(seed: int, settings: dict, scores: dict, learned: dict) -> None:
    """One seed's scores and what its learned merges learned, with the settings and code version
    that produced them (a run of its own, to be joined to the others' later)."""
    out = {"seed": seed, "role": SLICE_ROLE, "settings": settings, "scores": scores, "learned": learned,
           "code_version": code_version(), "git_commit": _zoo.git_commit()}
    path = slice_path(settings["preset"], seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1, default=str))
    tmp.replace(path)
    print(f"wrote {path}", flush=True)


def read_slice(seed: int, settings: dict) -> dict | None:
    """The stored slice of `seed` when it was measured with these settings (its methods may be
    more), else None."""
    path = slice_path(settings["preset"], seed)
    if not path.exists():
        return None
    sl = json.loads(path.read_text())
    want = json.loads(json.dumps(settings, default=str))
    have = sl["settings"]
    same = all(have.get(k) == v for k, v in want.items() if k != "methods")
    methods = all(have["methods"].get(m) == p for m, p in want["methods"].items())
    return sl if same and methods else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _zoo.dense_base_args(ap, preset="small", steps=300, steps_help="steps of each task's full fine-tune",
                         examples_help="test examples per algorithmic task")
    ap.add_argument("--windows", type=int, default=32, help="test windows per text domain")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--adamerging-steps", type=int, default=ADAMERGING["steps"], help="AdaMerging's steps (a smoke run: few)")
    ap.add_argument("--concrete-steps", type=int, default=None,
                    help="CONCRETE's mask steps and AdaMerging steps (a smoke run: few)")
    ap.add_argument("--wemoe-steps", type=int, default=WEMOE["steps"], help="WEMoE's router steps (a smoke run: few)")
    ap.add_argument("--twin-steps", type=int, default=TWIN["steps"], help="Twin-Merging's router steps (a smoke run: few)")
    ap.add_argument("--slice", action="store_true",
                    help="measure these seeds and store each one's scores as a slice (slices/merging_benchmark_"
                         "<preset>.seed<S>.json) without the table; a later run takes a seed from its slice when "
                         "the settings match")
    a = ap.parse_args(argv)
    if len(a.seeds) < 2 and not (a.slice or a.train_only):
        ap.error("--seeds needs at least two seeds for an interval (one seed at a time: --slice)")
    for m in ("adamerging_task", "adamerging_layer"):
        METHODS[m][1]["steps"] = a.adamerging_steps
    if a.concrete_steps is not None:
        METHODS["concrete_ta"][1]["steps"] = a.concrete_steps
        METHODS["concrete_adamerging"][1].update(steps=a.concrete_steps, adamerging_steps=a.concrete_steps)
    METHODS["wemoe"][1]["steps"] = a.wemoe_steps
    METHODS["twin_merging"][1]["steps"] = a.twin_steps
    log = lambda m: print(m, flush=True)
    suite = evals.resolve_tasks("all")
    texts = [t for t in suite if t.kind == "bits_per_byte"]
    kinds = {t.name: t.kind for t in suite}
    text_spec = mix_spec(",".join(t.name for t in texts))
    base_steps = a.base_steps or preset(a.preset)["train"]["steps"]
    settings = {"preset": a.preset, "base_steps": base_steps, "steps": a.steps, "examples": a.examples,
                "windows": a.windows, "methods": {m: METHODS[m] for m in a.methods}}
    sliced = {} if a.slice else {s: sl for s in a.seeds if (sl := read_slice(s, settings)) is not None}
    todo = [s for s in a.seeds if s not in sliced]
    for s, sl in sliced.items():
        log(f"seed {s}: from {slice_path(a.preset, s).name} (code {sl['code_version']})")
    bases = {s: lora_experts.base(a.preset, base_steps, s, text_spec) for s in todo}
    fts = {s: {t.name: moe_build.specialist(bases[s], t.name, a.steps, s) for t in suite} for s in todo}
    multi = {s: moe_build.specialist(bases[s], ",".join(t.name for t in suite), a.steps, s, name="mb_ft_multitask")
             for s in todo}
    if a.train_only:
        return

    def score(model, key: dict, tasks=suite) -> dict:
        def run():
            res = evals.evaluate(model, tasks, examples=a.examples, max_windows=a.windows, split="test", seed=0)
            return {x.task: x.value for x in res}

        return cached(_zoo.RUNS, "merge_bench_score", {"examples": a.examples, "windows": a.windows,
                                                        "tasks": [t.name for t in tasks], **key}, run)

    rows = {k: [] for k in ("base", "individual", "multitask", *a.methods)}
    learned = {m: [] for m in a.methods}
    for s in a.seeds:
        if s in sliced:
            for k in rows:
                rows[k].append(sliced[s]["scores"][k])
            for m in learned:
                learned[m].append(sliced[s]["learned"][m])
            continue
        base = open_model(bases[s]["dir"]).load()
        models = [open_model(fts[s][t.name]["dir"]).load() for t in suite]
        rows["base"].append(score(base, {"model": bases[s]["dir"]}))
        rows["individual"].append({t.name: score(m, {"model": fts[s][t.name]["dir"]}, [t])[t.name]
                                   for t, m in zip(suite, models)})
        rows["multitask"].append(score(open_model(multi[s]["dir"]).load(), {"model": multi[s]["dir"]}))
        for method in a.methods:
            key = {"merge": method, "params": METHODS[method], "models": [fts[s][t.name]["dir"] for t in suite],
                   "base": bases[s]["dir"], "seed": s}

            def run(method=method):
                model, info = merged_model(method, base, models, suite, s, log)
                res = evals.evaluate(model, suite, examples=a.examples, max_windows=a.windows, split="test", seed=0)
                return {"scores": {x.task: x.value for x in res}, "info": info}

            out = cached(_zoo.RUNS, "merge_bench_merge", {"examples": a.examples, "windows": a.windows, **key}, run)
            rows[method].append(out["scores"])
            learned[method].append(out["info"])
        for k, v in rows.items():
            log(f"   seed {s} {k}: " + ", ".join(f"{t} {x:.3f}" for t, x in v[-1].items()))
        if a.slice:
            write_slice(s, settings, {k: v[-1] for k, v in rows.items()}, {m: v[-1] for m, v in learned.items()})
    if a.slice:
        return
    names = [t.name for t in suite]
    normalized = {k: [bench.normalized_scores(r, own, kinds) for r, own in zip(rs, rows["individual"])]
                  for k, rs in rows.items()}
    # a task whose own fine-tune scores 0 has no normalised score; the mean is over the others
    undefined = sorted({f"{t} (seed {s})" for s, own in zip(a.seeds, rows["individual"]) for t in names if own[t] == 0})
    mean_norm = {k: [float(np.nanmean([n[t] for t in names])) for n in ns] for k, ns in normalized.items()}
    claims = []
    pairs = [("ties", "task_arithmetic"), ("adamerging_task", "ties"), ("adamerging_layer", "ties"),
             ("tsvm", "task_arithmetic"), ("task_arithmetic", "average"),
             ("concrete_ta", "task_arithmetic"), ("concrete_adamerging", "adamerging_layer"),
             ("wemoe", "ties"), ("wemoe", "adamerging_layer"), ("twin_merging", "ties"),
             ("twin_merging", "adamerging_layer")]
    for x, y in pairs:
        if x in mean_norm and y in mean_norm:
            claims.append(_zoo.claim(f"mean normalised score over {len(names)} tasks: {x} beats {y}", x, mean_norm[x],
                                     y, mean_norm[y], higher_is_better=True))
    _zoo.print_claims(claims)

    plt = _zoo.plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 4.2), gridspec_kw={"width_ratios": [1, 2.2]})
    order = ["base", *a.methods, "multitask", "individual"]
    vals = np.asarray([mean_norm[k] for k in order])
    ax.barh(np.arange(len(order)), vals.mean(1), xerr=vals.std(1), capsize=2,
            color=["#999"] + ["#4c72b0"] * len(a.methods) + ["#55a868", "#55a868"])
    ax.set_yticks(np.arange(len(order)), order)
    ax.invert_yaxis()
    ax.set(xlabel="mean normalised score (merged / own fine-tune)", title=f"{len(names)} tasks, {len(a.seeds)} seeds")
    grid = np.asarray([[np.nanmean([n[t] for n in normalized[k]]) for t in names] for k in order])
    im = bx.imshow(grid, cmap="viridis", aspect="auto", vmin=0, vmax=max(1.0, float(np.nanmax(grid, initial=0.0))))
    bx.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    bx.set_yticks(np.arange(len(order)), order)
    for i in range(len(order)):
        for j in range(len(names)):
            bx.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="k" if grid[i, j] > 0.6 else "w")
    fig.colorbar(im, ax=bx, fraction=0.03)
    bx.set_title("normalised score per task")
    payload = _zoo.payload("merging_benchmark", a.steps, a.seeds, claims, preset=a.preset, base_steps=base_steps,
                           examples=a.examples, windows=a.windows, methods={m: METHODS[m] for m in a.methods},
                           tasks=names, kinds=kinds, scores=rows, normalized=normalized, mean_normalized=mean_norm,
                           learned=learned, undefined_normalized=undefined,
                           slices={s: {k: sl[k] for k in ("code_version", "git_commit")} for s, sl in sliced.items()})
    payload["command"] += f" --preset {a.preset}"
    if a.methods != list(METHODS):
        payload["command"] += " --methods " + " ".join(a.methods)
    _zoo.save(f"merging_benchmark_{a.preset}", payload, fig)


if __name__ == "__main__":
    main()
