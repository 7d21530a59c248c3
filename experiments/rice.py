"""Expert steering (RICE) at small scale: do the two experts whose selection tracks a task
(nPMI of contrastive prompts) raise that task's accuracy when reinforced?

The tiny MoE trained on the mixture of every evaluation task (scmoe.py's, task_mixture.py's
and uoe.py's runs, shared through the run cache) is steered toward each algorithmic task in
turn: its train prompts are the positive prompts, the other algorithmic tasks' the negative
ones (64 each); the two (layer, expert) pairs of the highest nPMI (`jmoe steer`) get their
routing weight multiplied where selected (`jmoe generate --steer-experts`), by the paper's 64
and by a milder 4, the token's weights keeping their total. Every algorithmic task is then
answered greedily (exact match on the test split). Claims, paired by seed, on the mean over
target tasks: steering raises the target task's accuracy (the paper: up to +10 points on
AIME), at each factor. The other tasks' accuracy is reported alongside. Writes
experiments/results/rice.{json,png}; runs and scores are cached by configuration and code version.

    python experiments/rice.py [--steps 600] [--seeds 0 1 2] [--examples 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

from jmoe import evals  # noqa: E402
from jmoe.editing import expert_npmi, top_experts  # noqa: E402
from jmoe.infer.load import Model, open_model  # noqa: E402
from jmoe.routing.steer import steer_config  # noqa: E402

from _harness import cached  # noqa: E402

FACTORS = (4.0, 64.0)
PROMPTS = 64  # contrastive prompts per side


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _zoo.task_mixture_args(ap, examples=100)
    a = _zoo.parse_seeded(ap, argv)
    log = lambda m: print(m, flush=True)
    _, algorithmic, runs = _zoo.task_mixture_moe(a.steps, a.seeds)
    names = [t.name for t in algorithmic]

    plain, steered, experts = [], {f: [] for f in FACTORS}, []
    for s, run in zip(a.seeds, runs):
        model = open_model(run["dir"]).load()

        def score(cfg, key):
            def go():
                m = Model(cfg=cfg, params=model.params, state=model.state, tokenizer=model.tokenizer, source="rice")
                return {r.task: r.value for r in evals.evaluate(m, algorithmic, examples=a.examples, split="test",
                                                                seed=0)}

            return cached(_zoo.RUNS, "rice_score", {"model": run["dir"], "examples": a.examples, **key}, go)

        plain.append(score(model.cfg, {"steer": None}))
        prompts = {t.name: [model.tokenizer.encode(ex.prompt, add_special_tokens=False)
                            for ex in t.examples("train", PROMPTS, s)] for t in algorithmic}
        found = {}
        for t in names:
            negative = [p for o in names if o != t for p in prompts[o][: PROMPTS // (len(names) - 1)]]
            npmi = expert_npmi(model.cfg, model.params, prompts[t], negative, state=model.state or None)
            found[t] = [(layer, e, round(v, 4)) for layer, e, v in top_experts(model.cfg, npmi, 2)]
        experts.append(found)
        for f in FACTORS:
            steered[f].append({t: score(steer_config(model.cfg, [(layer, e) for layer, e, _ in found[t]], f),
                                        {"steer": found[t], "factor": f}) for t in names})
            log(f"   seed {s} factor {f:g}: target accuracy " + ", ".join(
                f"{t} {plain[-1][t]:.2f}->{steered[f][-1][t][t]:.2f}" for t in names))

    target = lambda rows: [float(np.mean([r[t][t] for t in names])) for r in rows]
    others = lambda rows: [float(np.mean([r[t][o] for t in names for o in names if o != t])) for r in rows]
    base = [float(np.mean([p[t] for t in names])) for p in plain]
    claims = [_zoo.claim(f"steering at x{f:g} raises the target task's accuracy (mean over {len(names)} targets)",
                         f"steered x{f:g}", target(steered[f]), "unsteered", base, higher_is_better=True)
              for f in FACTORS]
    _zoo.print_claims(claims)
    plt = _zoo.plt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    x = np.arange(len(names))
    ax.bar(x - 0.3, np.mean([[p[t] for t in names] for p in plain], 0), 0.3, label="unsteered")
    for i, f in enumerate(FACTORS):
        vals = np.asarray([[r[t][t] for t in names] for r in steered[f]])
        ax.bar(x + 0.3 * i, vals.mean(0), 0.3, yerr=vals.std(0), capsize=2, label=f"steered x{f:g}")
    ax.set_xticks(x, names)
    ax.set(ylabel="target task exact match", title=f"RICE steering toward each task, tiny MoE, {len(a.seeds)} seeds")
    ax.legend(fontsize=8)
    payload = _zoo.payload("rice", a.steps, a.seeds, claims, examples=a.examples, factors=list(FACTORS),
                           prompts=PROMPTS, tasks=names, plain=plain,
                           steered={str(f): v for f, v in steered.items()}, experts=experts,
                           target_accuracy={"unsteered": base, **{f"x{f:g}": target(steered[f]) for f in FACTORS}},
                           others_accuracy={"unsteered": base, **{f"x{f:g}": others(steered[f]) for f in FACTORS}})
    payload["command"] += f" --examples {a.examples}"
    _zoo.save("rice", payload, fig)


if __name__ == "__main__":
    main()
