"""UOE at small scale: forgetting one task in one expert against forgetting it in the whole model.

The tiny MoE trained on the mixture of every evaluation task (task_mixture.py's runs, shared
through the run cache) is made to forget one algorithmic task (--forget, default reversal) by
gradient ascent on its training text, two ways, each with Adam at the same learning rate:

  uoe     the expert with the highest router affinity to the task and its router, anchored
          (jmoe.editing.unlearn, scope "expert", alpha 1)
  full    every parameter, no anchor (scope "all"): the full-model unlearning UOE is
          measured against

Both are scored (exact match on the test split) after 10, 20, 40, 80 and 160 steps; each
stops at the first point where the forget task has lost at least half of its accuracy (the
last point if none has), as the paper picks the checkpoint that balances forgetting and
utility. Utility: the mean exact match of the other algorithmic tasks over the model's own.
Claims, paired by seed: UOE forgets (the forget task keeps under half its accuracy), and at
its stopping point keeps more utility than full-model unlearning at its own. Writes
experiments/results/uoe.{json,png}; runs and scores are cached by configuration and code
version.

    python experiments/uoe.py [--steps 600] [--seeds 0 1 2] [--examples 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

from jmoe import evals  # noqa: E402
from jmoe.data import load_corpus  # noqa: E402
from jmoe.data.batches import train_batch  # noqa: E402
from jmoe.editing import unlearn  # noqa: E402
from jmoe.evals.mixture import mix_spec  # noqa: E402
from jmoe.infer.load import Model, open_model  # noqa: E402

from _harness import cached  # noqa: E402

CHECKPOINTS = (10, 20, 40, 80, 160)
SCOPES = {"uoe": "expert", "full": "all"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _zoo.task_mixture_args(ap, examples=100)
    ap.add_argument("--forget", default="reversal")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batches", type=int, default=8, help="training windows of the forget task (batches of 16)")
    a = _zoo.parse_seeded(ap, argv)
    log = lambda m: print(m, flush=True)
    algorithmic = [t for t in evals.resolve_tasks("all") if t.kind == "exact_match"]
    others = [t for t in algorithmic if t.name != a.forget]
    if a.forget not in {t.name for t in algorithmic}:
        ap.error(f"--forget must be an algorithmic task: {', '.join(t.name for t in algorithmic)}")
    _, _, runs = _zoo.task_mixture_moe(a.steps, a.seeds)
    forget_text = load_corpus(mix_spec(a.forget)).train

    def score(model: Model) -> dict:
        res = evals.evaluate(model, algorithmic, examples=a.examples, split="test", seed=0)
        return {r.task: r.value for r in res}

    rows = {"model": [], **{m: [] for m in SCOPES}}
    picked = {m: [] for m in SCOPES}
    curves = {m: [] for m in SCOPES}
    targets = []
    for s, run in zip(a.seeds, runs):
        source = open_model(run["dir"]).load()
        own = cached(_zoo.RUNS, "uoe_own", {"model": run["dir"], "examples": a.examples}, lambda: score(source))
        rows["model"].append(own)
        batches = [train_batch(forget_text, s, i, 16, 128) for i in range(a.batches)]
        for method, scope in SCOPES.items():
            def run_one(method=method, scope=scope):
                snaps = {}
                _, info = unlearn(source.cfg, source.params, batches, scope=scope, method="ga",
                                  steps=max(CHECKPOINTS), lr=a.lr, state=source.state or None,
                                  callback=lambda k, p: snaps.__setitem__(k, jax.tree.map(np.asarray, p))
                                  if k in CHECKPOINTS else None)
                points = {str(k): score(Model(cfg=source.cfg, params=p, state=source.state,
                                              tokenizer=source.tokenizer, source=f"{method}@{k}"))
                          for k, p in sorted(snaps.items())}
                return {"points": points, "target": [info.get("layer"), info.get("expert")],
                        "trainable": info["trainable_params"], "total": info["total_params"]}

            out = cached(_zoo.RUNS, "uoe_unlearn", {"model": run["dir"], "forget": a.forget, "method": method,
                                                    "lr": a.lr, "batches": a.batches, "examples": a.examples,
                                                    "checkpoints": CHECKPOINTS}, run_one)
            util = lambda sc: float(np.mean([sc[t.name] / own[t.name] for t in others if own[t.name] > 0]))
            forget_share = lambda sc: sc[a.forget] / own[a.forget] if own[a.forget] > 0 else float("nan")
            curve = [(int(k), forget_share(v), util(v)) for k, v in out["points"].items()]
            stop = next((c for c in curve if c[1] <= 0.5), curve[-1])
            picked[method].append({"step": stop[0], "forget_share": stop[1], "utility": stop[2]})
            curves[method].append(curve)
            rows[method].append(out["points"][str(stop[0])])
            if method == "uoe":
                targets.append(out["target"])
            log(f"   seed {s} {method}: stops at step {stop[0]}, forget task at {stop[1]:.2f} of its accuracy, "
                f"utility {stop[2]:.3f} ({out['trainable']:,} of {out['total']:,} parameters trained)")
    claims = [
        _zoo.claim(f"UOE forgets {a.forget}: under half its accuracy at the stopping point", "uoe forget share",
                   [p["forget_share"] for p in picked["uoe"]], "half", [0.5] * len(a.seeds), higher_is_better=False),
        _zoo.claim("UOE keeps more of the other tasks than full-model unlearning", "uoe utility",
                   [p["utility"] for p in picked["uoe"]], "full utility", [p["utility"] for p in picked["full"]],
                   higher_is_better=True),
    ]
    _zoo.print_claims(claims)
    plt = _zoo.plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for method, color in (("uoe", "#4c72b0"), ("full", "#dd8452")):
        c = np.asarray(curves[method])  # [seeds, points, 3]
        ax.errorbar(c[0, :, 0], c[:, :, 1].mean(0), yerr=c[:, :, 1].std(0), marker="o", capsize=3, color=color,
                    label=method)
        bx.errorbar(c[0, :, 0], c[:, :, 2].mean(0), yerr=c[:, :, 2].std(0), marker="o", capsize=3, color=color,
                    label=method)
    ax.set(xscale="log", xlabel="unlearning steps", ylabel=f"{a.forget}: share of its accuracy kept",
           title="forgetting")
    bx.set(xscale="log", xlabel="unlearning steps", ylabel="other tasks: share of accuracy kept", title="utility")
    ax.legend()
    payload = _zoo.payload("uoe", a.steps, a.seeds, claims, forget=a.forget, lr=a.lr, batches=a.batches,
                           examples=a.examples, checkpoints=list(CHECKPOINTS), scores=rows, picked=picked,
                           curves=curves, targets=targets)
    _zoo.save("uoe", payload, fig)


if __name__ == "__main__":
    main()
