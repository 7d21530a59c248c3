"""Merge, then compress: M-SMoE, MC-SMoE and their baselines on a trained tiny MoE LM.

The source is the tiny preset's E=8, top-2 model trained for 600 steps (the routing
experiments' baseline; trained here if missing). Each MoE layer is reduced to 50% (4) and
25% (2) experts on average with
  msmoe    routing-guided groups, neuron alignment, frequency-weighted merge (router "share")
  average  the same groups, uniform average, no alignment
  random   random groups, uniform average
  prune    keep the most used experts, drop the rest
then MC-SMoE compresses the 50% M-SMoE model's experts to low rank + sparse residual at half
their size (so its expert memory matches the 25% models). Every reduced model is evaluated as
is and after a short recovery fine-tune (`--ft-steps`, fresh optimizer, lower learning rate;
for MC-SMoE: the merged model is fine-tuned, then compressed, since training the dense weights
would undo the compressed structure), plus one fine-tune with distillation from the original.
Every source seed (0, 1, 2: the routing experiments' top-2 runs) is reduced and fine-tuned on
its own; the claims compare methods seed by seed (`_zoo.claim`). Writes
experiments/results/merge_then_compress.{json,png}.

    python experiments/merge_then_compress.py [--ft-steps 100] [--seeds 0 1 2]
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

import jmoe.io.safetensors  # noqa: E402,F401  (imported before the code version: compress_run writes with it)
import jmoe.merge.experts.compress  # noqa: E402,F401
from _harness import code_version  # noqa: E402
from jmoe.merge.experts.run import compress_run  # noqa: E402
from jmoe.train import TrainConfig, load_run, train  # noqa: E402

MTC_VERSION = code_version()  # the source runs' training code and the reduction's (jmoe.merge)

METHODS = ("msmoe", "average", "random", "prune")
MC = "mcsmoe (rank 16, 50%)"


def runs_of(source: Path) -> Path:
    """Where the reductions of one source run live: named by the source (its configuration and
    training code) and by the code version of the reduction (jmoe.merge included)."""
    return _zoo.RESULTS / "mtc_runs" / f"{source.name}-{MTC_VERSION}"


def reduced(source: Path, name: str, **kw) -> tuple[Path, dict]:
    runs = runs_of(source)
    out = runs / name
    stats = runs / "routing_stats.npz"
    if not (out / "report.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        print(f"== {source.name}: {name}", flush=True)
        runs.mkdir(parents=True, exist_ok=True)
        compress_run(source, out, calib_batches=8, stats=stats if stats.exists() else None,
                     log=lambda m: print("   " + m, flush=True), **kw)
        if not stats.exists():
            shutil.copy(out / "routing_stats.npz", stats)
    return out, json.loads((out / "report.json").read_text())


def fine_tune(run: Path, steps: int, distill_from: Path | None = None, name: str | None = None,
              where: Path | None = None) -> float:
    """Validation loss of `run` after a `steps`-step fine-tune, stored next to it (or in `where`)."""
    out = (where or run.parent) / ((name or run.name) + ("-kd" if distill_from else "") + f"-ft{steps}")
    if not (out / "summary.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        model, tc, *_ = load_run(run)
        ft = tc.replace(steps=steps, lr=1e-3, warmup_steps=min(10, steps), eval_every=steps, ckpt_every=steps, seed=1,
                        init_from=str(run.absolute()), distill_from=str(distill_from.absolute()) if distill_from else None,
                        distill_weight=0.5)
        print(f"== fine-tuning {out.name}", flush=True)
        train(model, ft, out, corpus=_zoo.corpus(), progress=False, log=lambda m: print("   " + m, flush=True))
    return json.loads((out / "summary.json").read_text())["val_loss"]


def reduce_source(source: Path, ft_steps: int) -> dict:
    """Every reduction of one source run, as reduced and fine-tuned."""
    rows = {}
    for target in (4, 2):
        for method in METHODS:
            run, rep = reduced(source, f"{method}-{target}", method=method, target_experts=target)
            rows[(method, target)] = {"run": run, "report": rep, "ft": fine_tune(run, ft_steps)}
    run, rep = reduced(source, "mcsmoe-4-b50", method="mcsmoe", target_experts=4, rank=16, budget=0.5)
    # fine-tuning dense weights would undo the low-rank + sparse structure: fine-tune the merged
    # model, then compress it the same way
    rows[(MC, 4)] = {"run": run, "report": rep,
                     "ft": compress_fine_tuned(runs_of(source) / "msmoe-4", ft_steps, rank=16, budget=0.5)}
    return {"rows": rows, "original": rows[("msmoe", 4)]["report"]["val_loss_before"],
            "original_ft": fine_tune_source(source, ft_steps),
            "kd_ft": fine_tune(rows[("msmoe", 2)]["run"], ft_steps, distill_from=source)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ft-steps", type=int, default=100)
    p.add_argument("--steps", type=int, default=600, help="training steps of the source models")
    p.add_argument("--seeds", type=int, nargs="+", default=list(_zoo.SEEDS))
    a = p.parse_args(argv)
    if len(a.seeds) < 2:
        p.error("--seeds needs at least two seeds for an interval")
    sources = [Path(r["dir"]) for r in _zoo.runs("top2", a.steps, a.seeds)]
    per_seed = [reduce_source(src, a.ft_steps) for src in sources]

    def values(key, field):
        return [s["rows"][key][field] if field == "ft" else s["rows"][key]["report"]["val_loss_after"] for s in per_seed]

    rows = []
    for (name, experts) in per_seed[0]["rows"]:
        rep = per_seed[0]["rows"][(name, experts)]["report"]
        rows.append({"name": name, "experts": experts, "memory": rep["memory_ratio"],
                     "expert_memory": rep["expert_params_after"] / rep["expert_params_before"],
                     "val": _zoo.summary(values((name, experts), "val")), "ft": _zoo.summary(values((name, experts), "ft")),
                     "report": rep})
    claims = []
    for target in (4, 2):
        for other in METHODS[1:]:
            for field, when in (("val", "as reduced"), ("ft", "fine-tuned")):
                claims.append(_zoo.claim(f"{target} experts, {when}: M-SMoE beats {other}", "M-SMoE",
                                         values(("msmoe", target), field), other, values((other, target), field),
                                         higher_is_better=False))
    for field, when in (("val", "as reduced"), ("ft", "fine-tuned")):
        claims.append(_zoo.claim(f"25% of the expert memory, {when}: MC-SMoE beats M-SMoE with 2 experts", "MC-SMoE",
                                 values((MC, 4), field), "M-SMoE 2", values(("msmoe", 2), field), higher_is_better=False))
    claims.append(_zoo.claim("M-SMoE 2 experts fine-tuned: distillation from the original helps", "with distillation",
                             [s["kd_ft"] for s in per_seed], "without", values(("msmoe", 2), "ft"),
                             higher_is_better=False))
    print(_zoo.table([{**r, "val_s": _zoo.fmt_ci(r["val"]), "ft_s": _zoo.fmt_ci(r["ft"])} for r in rows],
                     [("method", "{name}"), ("experts/layer", "{experts}"), ("expert memory", "{expert_memory:.0%}"),
                      ("model memory", "{memory:.0%}"), ("val loss", "{val_s}"), (f"after {a.ft_steps}-step FT", "{ft_s}")]))
    _zoo.print_claims(claims)

    plt = _zoo.plt()
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = {"msmoe": "C0", "average": "C1", "random": "C2", "prune": "C3"}
    original = _zoo.summary([s["original"] for s in per_seed])["mean"]
    original_ft = _zoo.summary([s["original_ft"] for s in per_seed])["mean"]
    for i, (key, title) in enumerate((("val", "as reduced"), ("ft", f"after a {a.ft_steps}-step fine-tune"))):
        for r in rows:
            ax[i].errorbar(r["memory"], r[key]["mean"], yerr=r[key]["sd"], color=colors.get(r["name"], "C4"), capsize=3,
                           marker="o" if r["experts"] == 4 else "s", label=f"{r['name']} ({r['experts']} experts)")
        ax[i].axhline(original if key == "val" else original_ft, color="k", ls="--", lw=1,
                      label="original" if key == "val" else "original, same fine-tune")
        ax[i].set(xlabel="parameter memory (fraction of the original model)", title=title)
        ax[i].grid(alpha=0.3)
    ax[0].set_ylabel("validation loss (nats/byte, mean ± sd over seeds)")
    ax[1].legend(fontsize=7)
    payload = _zoo.payload("merge_then_compress", a.steps, a.seeds, claims, rows=rows, reduction_code_version=MTC_VERSION,
                           original=_zoo.summary([s["original"] for s in per_seed]),
                           original_ft=_zoo.summary([s["original_ft"] for s in per_seed]),
                           kd_ft=_zoo.summary([s["kd_ft"] for s in per_seed]), ft_steps=a.ft_steps)
    payload["command"] = (f"python experiments/merge_then_compress.py --ft-steps {a.ft_steps} --seeds "
                          + " ".join(str(x) for x in a.seeds))
    _zoo.save("merge_then_compress", payload, fig)


def compress_fine_tuned(merged: Path, steps: int, **compression) -> float:
    """Validation loss of the fine-tuned merged model after MC-SMoE compression."""
    from jmoe.data import eval_batches
    from jmoe.merge.experts import compress_experts
    from jmoe.train.trainer import evaluate

    fine_tune(merged, steps)
    model, tc, params, router_state, _, _ = load_run(merged.parent / f"{merged.name}-ft{steps}")
    params = jax.tree.map(np.asarray, params)
    compressed, _, _ = compress_experts(params, model, **compression)
    val = eval_batches(_zoo.corpus().val, tc.eval_batches, tc.batch_size, tc.seq_len)
    return evaluate(compressed, router_state, model, val)["val_loss"]


def fine_tune_source(source: Path, steps: int) -> float:
    """The original model under the same fine-tune (the reference the recovered models approach)."""
    return fine_tune(source, steps, name="original", where=runs_of(source))


if __name__ == "__main__":
    main()
