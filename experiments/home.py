"""HoME at small scale: a multi-task head with shared, category and task experts (HoME) against
MMoE and one shared mixture of experts, on the same frozen model and with about the same
number of parameters.

The tiny MoE trained on the mixture of every evaluation task (task_mixture.py's runs, shared
through the run cache) is frozen; `jmoe task-head` trains a head over its last hidden state
for the 8 tasks (two categories: the algorithmic tasks and the text domains), --head-steps
steps of 4 windows per task at lr --lr, per seed and kind:

  home    HoME: one global shared, one category and one task expert per level, normalised
          Swish experts, feature and self gates
  mmoe    MMoE: E ReLU experts, a softmax gate and a tower per task (E matching HoME's
          parameters)
  shared  one gate and one tower for every task over E experts (likewise)

Scores: every task's validation loss without and with the head (32 windows of 128 bytes per
task), their mean; the share of the head's expert units that are exactly zero (the paper's
"expert collapse" of ReLU MMoE) and the share of (task, expert) gate weights under 0.01 (its
"degraded" experts). Claims, paired by seed, on the mean validation loss over tasks (the
paper: HoME beats MMoE, and task outputs beat one shared output): HoME < MMoE, HoME <
shared, MMoE < shared. Writes experiments/results/home.{json,png}; heads are cached by
configuration and code version.

    python experiments/home.py [--steps 600] [--seeds 0 1 2] [--head-steps 300] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

from jmoe import evals  # noqa: E402
from jmoe.nn.task_head import head_config, head_params  # noqa: E402
from jmoe.train.task_head import task_head_run  # noqa: E402

from _harness import config_key  # noqa: E402

KINDS = ("home", "mmoe", "shared")
EVAL_BATCHES = 8


def matched_experts(tasks, kind: str, d_model: int, target: int) -> int:
    """The number of experts of `kind` whose head has the parameter count nearest `target`."""
    return min(range(1, 129), key=lambda e: abs(head_params(head_config(tasks, kind, d_model, experts=e)) - target))


def head_report(src: Path, kind: str, experts: int, seed: int, a) -> dict:
    """The report of a head of `kind` on run `src` (trained once per configuration and code)."""
    key = config_key([str(src.absolute()), kind, experts, a.head_steps, a.lr, EVAL_BATCHES, seed], _zoo.CODE_VERSION)
    out = _zoo.RUNS / f"home_{kind}-{key[:10]}"
    if not (out / "report.json").exists():
        task_head_run(src, out, tasks="all", kind=kind, experts=experts, steps=a.head_steps, lr=a.lr,
                      eval_batches=EVAL_BATCHES, seed=seed, log=lambda m: print("   " + m, flush=True))
    return json.loads((out / "report.json").read_text())


def degraded_share(gates: dict, floor: float = 0.01) -> float:
    """The share of (task, expert) gate weights under `floor`."""
    weights = np.concatenate([np.asarray(w) for w in gates.values()])
    return float(np.mean(weights < floor))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="training steps of the task-mixture MoE")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(_zoo.SEEDS))
    ap.add_argument("--head-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = _zoo.parse_seeded(ap, argv)
    log = lambda m: print(m, flush=True)
    tasks = evals.resolve_tasks("all")
    _, _, runs = _zoo.task_mixture_moe(a.steps, a.seeds)
    d_model = _zoo.tiny().d_model
    target = head_params(head_config(tasks, "home", d_model))
    experts = {"home": None, **{k: matched_experts(tasks, k, d_model, target) for k in ("mmoe", "shared")}}
    params = {k: head_params(head_config(tasks, k, d_model, experts=experts[k] or 8)) for k in KINDS}
    log("head parameters: " + ", ".join(f"{k} {params[k]:,}" + (f" ({experts[k]} experts)" if experts[k] else "")
                                        for k in KINDS))

    reports = {k: [] for k in KINDS}
    for s, run in zip(a.seeds, runs):
        for k in KINDS:
            r = head_report(Path(run["dir"]), k, experts[k] or 8, s, a)
            reports[k].append(r)
            sc = r["scores"]
            log(f"   seed {s} {k}: mean validation loss {sc['model_loss']:.4f} -> {sc['head_loss']:.4f}; zero units "
                f"{sc['zero_share']:.1%}, gate weights under 0.01 {degraded_share(sc['gates']):.1%}")

    loss = {k: [r["scores"]["head_loss"] for r in reports[k]] for k in KINDS}
    model_loss = [r["scores"]["model_loss"] for r in reports["home"]]
    claims = [
        _zoo.claim("HoME beats MMoE (mean validation loss over tasks)", "home", loss["home"], "mmoe", loss["mmoe"],
                   higher_is_better=False),
        _zoo.claim("HoME beats one shared mixture", "home", loss["home"], "shared", loss["shared"],
                   higher_is_better=False),
        _zoo.claim("MMoE beats one shared mixture", "mmoe", loss["mmoe"], "shared", loss["shared"],
                   higher_is_better=False),
    ]
    _zoo.print_claims(claims)
    per_task = {k: {t.name: [r["scores"]["tasks"][t.name]["head_loss"] for r in reports[k]] for t in tasks}
                for k in KINDS}
    base_task = {t.name: [r["scores"]["tasks"][t.name]["model_loss"] for r in reports["home"]] for t in tasks}
    stats = {k: {"zero_share": [r["scores"]["zero_share"] for r in reports[k]],
                 "degraded_share": [degraded_share(r["scores"]["gates"]) for r in reports[k]],
                 "wall_s": [r["wall_s"] for r in reports[k]]} for k in KINDS}

    plt = _zoo.plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [t.name for t in tasks]
    width = 0.8 / len(KINDS)
    for i, (k, color) in enumerate(zip(KINDS, ("#4c72b0", "#dd8452", "#55a868"))):
        gain = np.asarray([[b - h for b, h in zip(base_task[n], per_task[k][n])] for n in names])  # [tasks, seeds]
        ax.bar(np.arange(len(names)) + (i - 1) * width, gain.mean(1), width, yerr=gain.std(1, ddof=1) if gain.shape[1] > 1
               else None, color=color, label=f"{k} ({params[k]:,} parameters)")
    ax.set_xticks(np.arange(len(names)), names, rotation=30)
    ax.axhline(0, color="#999", lw=0.8)
    ax.set(ylabel="validation loss gain over the frozen model (nats/byte)")
    ax.legend(fontsize=8)
    fig.suptitle(f"Multi-task heads on the tiny task-mixture MoE, {len(a.seeds)} seeds")
    payload = _zoo.payload("home", a.steps, a.seeds, claims, head_steps=a.head_steps, lr=a.lr,
                           eval_windows=EVAL_BATCHES * reports["home"][0]["rows"], experts=experts, head_params=params,
                           model_loss=model_loss, head_loss=loss, per_task=per_task, model_per_task=base_task,
                           stats=stats)
    payload["command"] += f" --head-steps {a.head_steps} --lr {a.lr}"
    _zoo.save("home", payload, fig)


if __name__ == "__main__":
    main()
