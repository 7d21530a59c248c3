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
Writes experiments/results/merge_then_compress.{json,png}.

    python experiments/merge_then_compress.py [--ft-steps 100]
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

from jmoe.merge.experts.run import compress_run  # noqa: E402
from jmoe.train import TrainConfig, load_run, train  # noqa: E402

RUNS = _zoo.RESULTS / "mtc_runs"


def reduced(source: Path, name: str, **kw) -> tuple[Path, dict]:
    out = RUNS / name
    if not (out / "report.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        print(f"== {name}", flush=True)
        compress_run(source, out, calib_batches=8, stats=RUNS / "routing_stats.npz" if (RUNS / "routing_stats.npz").exists() else None,
                     log=lambda m: print("   " + m, flush=True), **kw)
        if not (RUNS / "routing_stats.npz").exists():
            shutil.copy(out / "routing_stats.npz", RUNS / "routing_stats.npz")
    return out, json.loads((out / "report.json").read_text())


def fine_tune(run: Path, steps: int, distill_from: Path | None = None, name: str | None = None) -> float:
    out = RUNS / ((name or run.name) + ("-kd" if distill_from else "") + f"-ft{steps}")
    if not (out / "summary.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        model, tc, *_ = load_run(run)
        ft = tc.replace(steps=steps, lr=1e-3, warmup_steps=min(10, steps), eval_every=steps, ckpt_every=steps, seed=1,
                        init_from=str(run.absolute()), distill_from=str(distill_from.absolute()) if distill_from else None,
                        distill_weight=0.5)
        print(f"== fine-tuning {out.name}", flush=True)
        train(model, ft, out, corpus=_zoo.corpus(), progress=False, log=lambda m: print("   " + m, flush=True))
    return json.loads((out / "summary.json").read_text())["val_loss"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ft-steps", type=int, default=100)
    p.add_argument("--steps", type=int, default=600, help="training steps of the source model")
    a = p.parse_args(argv)
    source = Path(_zoo.run("top2", _zoo.tiny(), _zoo.tiny_train(a.steps, 0))["dir"])
    RUNS.mkdir(parents=True, exist_ok=True)
    rows = []
    for target in (4, 2):
        for method in ("msmoe", "average", "random", "prune"):
            run, rep = reduced(source, f"{method}-{target}", method=method, target_experts=target)
            rows.append({"name": method, "experts": target, "run": run, "report": rep})
    run, rep = reduced(source, "mcsmoe-4-b50", method="mcsmoe", target_experts=4, rank=16, budget=0.5)
    rows.append({"name": "mcsmoe (rank 16, 50%)", "experts": 4, "run": run, "report": rep})
    original = rows[0]["report"]["val_loss_before"]
    for r in rows:
        rep = r["report"]
        r["memory"] = rep["memory_ratio"]
        r["expert_memory"] = rep["expert_params_after"] / rep["expert_params_before"]
        r["val"] = rep["val_loss_after"]
        if r["name"].startswith("mcsmoe"):
            # fine-tuning dense weights would undo the low-rank + sparse structure: fine-tune the
            # merged model, then compress it the same way
            r["ft"] = compress_fine_tuned(RUNS / "msmoe-4", a.ft_steps, rank=16, budget=0.5)
        else:
            r["ft"] = fine_tune(r["run"], a.ft_steps)
    kd_row = next(r for r in rows if r["name"] == "msmoe" and r["experts"] == 2)
    kd = fine_tune(kd_row["run"], a.ft_steps, distill_from=source)
    base_ft = fine_tune_source(source, a.ft_steps)
    print(f"original model: validation loss {original:.4f} (after the same {a.ft_steps}-step fine-tune: {base_ft:.4f})")
    print(_zoo.table(rows, [("method", "{name}"), ("experts/layer", "{experts}"), ("expert memory", "{expert_memory:.0%}"),
                            ("model memory", "{memory:.0%}"), ("val loss", "{val:.4f}"), (f"after {a.ft_steps}-step FT", "{ft:.4f}")]))
    print(f"msmoe 25% fine-tuned with distillation from the original: {kd:.4f} (without: {kd_row['ft']:.4f})")

    verdict = []
    for target in (4, 2):
        group = [r for r in rows if r["experts"] == target and not r["name"].startswith("mcsmoe")]
        for key, when in (("val", "as is"), ("ft", "after fine-tuning")):
            order = sorted(group, key=lambda r: r[key])
            verdict.append(f"{target} experts ({order[0]['expert_memory']:.0%} of expert memory), {when}: "
                           + " < ".join(f"{r['name']} {r[key]:.4f}" for r in order))
    mc = rows[-1]
    quarter = sorted((r for r in rows if r["experts"] == 2), key=lambda r: r["ft"])
    verdict.append(f"MC-SMoE at {mc['expert_memory']:.0%} expert memory: {mc['val']:.4f} as is, {mc['ft']:.4f} fine-tuned; "
                   f"best 25%-expert model {quarter[0]['name']} {quarter[0]['val']:.4f} / {quarter[0]['ft']:.4f}")
    for v in verdict:
        print(v)

    plt = _zoo.plt()
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = {"msmoe": "C0", "average": "C1", "random": "C2", "prune": "C3"}
    for i, (key, title) in enumerate((("val", "as reduced"), ("ft", f"after a {a.ft_steps}-step fine-tune"))):
        for r in rows:
            c = colors.get(r["name"], "C4")
            ax[i].scatter(r["memory"], r[key], color=c, s=50, marker="o" if r["experts"] == 4 else "s",
                          label=f"{r['name']} ({r['experts']} experts)")
        ax[i].axhline(original if key == "val" else base_ft, color="k", ls="--", lw=1,
                      label="original" if key == "val" else "original, same fine-tune")
        ax[i].set(xlabel="parameter memory (fraction of the original model)", title=title)
        ax[i].grid(alpha=0.3)
    ax[0].set_ylabel("validation loss (nats/byte)")
    ax[1].legend(fontsize=7)
    payload = {"command": f"python experiments/merge_then_compress.py --ft-steps {a.ft_steps}", "original_val": original,
               "original_ft": base_ft, "kd_ft": kd,
               "rows": [{k: v for k, v in r.items() if k not in ("run",)} for r in rows], "verdict": verdict}
    _zoo.save("merge_then_compress", payload, fig)


def compress_fine_tuned(merged: Path, steps: int, **compression) -> float:
    """Validation loss of the fine-tuned merged model after MC-SMoE compression."""
    from jmoe.data import eval_batches
    from jmoe.merge.experts import compress_experts
    from jmoe.train.trainer import evaluate

    fine_tune(merged, steps)
    model, tc, params, router_state, _, _ = load_run(RUNS / f"{merged.name}-ft{steps}")
    params = jax.tree.map(np.asarray, params)
    compressed, _, _ = compress_experts(params, model, **compression)
    val = eval_batches(_zoo.corpus().val, tc.eval_batches, tc.batch_size, tc.seq_len)
    return evaluate(compressed, router_state, model, val)["val_loss"]


def fine_tune_source(source: Path, steps: int) -> float:
    """The original model under the same fine-tune (the reference the recovered models approach)."""
    return fine_tune(source, steps, name="original")


if __name__ == "__main__":
    main()
