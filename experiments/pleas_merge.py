"""PLeaS on language models: two fine-tunes of *different* bases merged into one model of a
chosen width, against merging by permutation alone and against plain weight averaging.

The merging benchmark's zoo (`merging_benchmark.py`: one dense base per seed, trained from its
own initialisation, and its fine-tunes) gives the pairs: replicate p merges base p's fine-tune
on text domain D_p with base p+1's fine-tune on D_(p+1) (prose, python, unicode, cyclically),
so every pair was trained from two initialisations. Methods, each at ratio 0 (FFN width d_ff),
0.5 and 1 (2 d_ff; the fraction of each FFN's units kept from both models):

  average        the two models' weights averaged, units unmatched (ratio 0 only)
  permute        units matched by activations, the partial merge's weights (no refit)
  pleas          the same, then every layer refit by least squares (jmoe.merge.pleas)

with 2 x 16 unlabeled windows of each model's domain as the matching and fitting data. Each
merge is scored on both domains' test text (bits per byte), normalised by each domain's own
fine-tune (own / merged), averaged over the two. Claims, paired by replicate: PLeaS beats
permutation alone at ratio 0 and at ratio 1 (the paper's claim against permutation-only
merging), and PLeaS at ratio 1 beats PLeaS at ratio 0 (width buys quality). Writes
experiments/results/pleas_merge.{json,png}; cached by configuration and code version.

    python experiments/pleas_merge.py --preset tiny
"""

from __future__ import annotations

import argparse
import sys
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

from _harness import cached  # noqa: E402

RATIOS = (0.0, 0.5, 1.0)
UNLABELED = 32


def merged(method: str, ratio: float, a: Model, b: Model, calib) -> Model:
    if method == "average":
        cfg, params = a.cfg, jax.tree.map(lambda x, y: (x + y) / 2, a.params, b.params)
    else:
        cfg, params = merge.pleas(a.cfg, a.params, b.params, calib, ratio=ratio, least_squares=method == "pleas")
    return Model(cfg=cfg, params=params, state=a.state, tokenizer=a.tokenizer, source=f"{method}@{ratio}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _zoo.dense_base_args(ap, preset="small", steps=300, steps_help="steps of each fine-tune (the merging benchmark's)")
    ap.add_argument("--windows", type=int, default=32, help="test windows per text domain")
    a = _zoo.parse_seeded(ap, argv)
    log = lambda m: print(m, flush=True)
    suite = evals.resolve_tasks("all")
    texts = [t for t in suite if t.kind == "bits_per_byte"]
    text_spec = mix_spec(",".join(t.name for t in texts))
    base_steps = a.base_steps or preset(a.preset)["train"]["steps"]
    bases = {s: lora_experts.base(a.preset, base_steps, s, text_spec) for s in a.seeds}
    pairs = []
    for p, s in enumerate(a.seeds):
        s2 = a.seeds[(p + 1) % len(a.seeds)]
        da, db = texts[p % len(texts)], texts[(p + 1) % len(texts)]
        pairs.append((da, moe_build.specialist(bases[s], da.name, a.steps, s),
                      db, moe_build.specialist(bases[s2], db.name, a.steps, s2)))
    if a.train_only:
        return
    methods = [("average", 0.0)] + [(m, r) for m in ("permute", "pleas") for r in RATIOS]
    rows = {f"{m}@{r:g}": [] for m, r in methods}
    widths = {}
    for p, (da, ra, db, rb) in enumerate(pairs):
        ma, mb = open_model(ra["dir"]).load(), open_model(rb["dir"]).load()
        own = {}
        for t, m, r in ((da, ma, ra), (db, mb, rb)):
            own[t.name] = cached(_zoo.RUNS, "pleas_own", {"model": r["dir"], "task": t.name, "windows": a.windows},
                                 lambda m=m, t=t: evals.evaluate(m, [t], max_windows=a.windows, split="test")[0].value)
        calib = [x for t in (da, db) for x, _ in bench.unlabeled_batches(t, ma.tokenizer, n=UNLABELED, seed=p)]
        for method, ratio in methods:
            def run(method=method, ratio=ratio):
                model = merged(method, ratio, ma, mb, calib)
                res = evals.evaluate(model, [da, db], max_windows=a.windows, split="test")
                return {"bpb": {x.task: x.value for x in res}, "d_ff": model.cfg.d_ff}

            out = cached(_zoo.RUNS, "pleas_merge", {"a": ra["dir"], "b": rb["dir"], "method": method, "ratio": ratio,
                                                    "windows": a.windows, "calib": UNLABELED, "pair": p}, run)
            key = f"{method}@{ratio:g}"
            rows[key].append(float(np.mean([own[t] / out["bpb"][t] for t in (da.name, db.name)])))
            widths[key] = out["d_ff"]
            log(f"   pair {p} ({da.name} x {db.name}) {key}: normalised {rows[key][-1]:.4f} "
                f"(bpb {', '.join(f'{t} {v:.3f}' for t, v in out['bpb'].items())})")
    claims = [
        _zoo.claim("PLeaS beats permutation alone at ratio 0", "pleas@0", rows["pleas@0"], "permute@0", rows["permute@0"],
                   higher_is_better=True),
        _zoo.claim("PLeaS beats permutation alone at ratio 1", "pleas@1", rows["pleas@1"], "permute@1", rows["permute@1"],
                   higher_is_better=True),
        _zoo.claim("PLeaS at ratio 1 (2 d_ff) beats PLeaS at ratio 0", "pleas@1", rows["pleas@1"], "pleas@0",
                   rows["pleas@0"], higher_is_better=True),
        _zoo.claim("permutation at ratio 0 beats plain averaging", "permute@0", rows["permute@0"], "average@0",
                   rows["average@0"], higher_is_better=True),
    ]
    _zoo.print_claims(claims)
    plt = _zoo.plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, color in (("permute", "#dd8452"), ("pleas", "#4c72b0")):
        vals = np.asarray([rows[f"{method}@{r:g}"] for r in RATIOS])
        ax.errorbar([widths[f"{method}@{r:g}"] for r in RATIOS], vals.mean(1), yerr=vals.std(1), marker="o",
                    capsize=3, label=method, color=color)
    ax.axhline(np.mean(rows["average@0"]), color="#999", ls="--", label="average (unmatched)")
    ax.set(xlabel="merged FFN width d_ff", ylabel="normalised score (own bpb / merged bpb)",
           title=f"two fine-tunes of different bases, {len(pairs)} pairs")
    ax.legend()
    payload = _zoo.payload("pleas_merge", a.steps, a.seeds, claims, preset=a.preset, base_steps=base_steps,
                           windows=a.windows, pairs=[[da.name, ra["dir"], db.name, rb["dir"]] for da, ra, db, rb in pairs],
                           normalized=rows, widths=widths)
    payload["command"] += f" --preset {a.preset}"
    _zoo.save("pleas_merge", payload, fig)


if __name__ == "__main__":
    main()
