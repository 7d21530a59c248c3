"""Compressed experts at small scale: fine-tuning with each token's second expert replaced by
its compressed form, against fine-tuning the full top-2 model and a plain drop to top-1.

The tiny MoE trained on the mixture of every evaluation task (task_mixture.py's runs, shared
through the run cache; top-2 of 8 experts) is fine-tuned --ft-steps steps further on the same
mixture (every parameter, as the reference's full SFT; learning rate --lr), three ways:

  full        the model as it is: two experts per token
  compressed  the second-ranked expert of each token replaced by its compressed form
              (jmoe.editing.compress_experts, num_compressed 1: three scaling vectors per
              expert, ones at the start); one expert per token computed
  drop        only the first-ranked expert, its weight rescaled to the pair's (the routing
              edit "ranks" with ranks (0,)); one expert per token computed

Scores: exact match on the test split of every algorithmic task (mean over the tasks) and the
mixture's validation loss. Claims, paired by seed (the paper: compressed experts "recover
over 90% of full expert performance ... while reducing more than 30% active parameters"):
compressed keeps more than 90% of full's exact match, and beats the plain drop. The active
parameters per token of each variant are reported. Writes
experiments/results/compressed_experts.{json,png}; runs and scores are cached by
configuration and code version.

    python experiments/compressed_experts.py [--steps 600] [--seeds 0 1 2] [--ft-steps 200] [--examples 100]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

from jmoe import evals  # noqa: E402
from jmoe.editing import active_expert_fraction  # noqa: E402
from jmoe.editing.compressed import compressed_run  # noqa: E402
from jmoe.infer.load import open_model  # noqa: E402
from jmoe.nn import LMConfig  # noqa: E402

from _harness import cached, config_key  # noqa: E402

VARIANTS = ("full", "compressed", "drop")
LR, WARMUP = 1e-3, 20


def variant_config(cfg, variant: str):
    if variant == "compressed":
        from jmoe.editing import compressed_config

        return compressed_config(cfg, 1)
    if variant == "drop":
        return cfg.with_moe(routing_edit="ranks", routing_edit_options={"ranks": [0]})
    return cfg


def start_run(src: Path, variant: str) -> Path:
    """The run a variant's fine-tune starts from: the source itself (full), or the source
    converted (written once next to the other runs, keyed by the source and the code)."""
    if variant == "full":
        return src
    out = _zoo.RUNS / f"ce_start_{variant}-{config_key([str(src.absolute()), variant], _zoo.CODE_VERSION)[:10]}"
    if (out / "config.json").exists():
        return out
    if variant == "compressed":  # what `jmoe compressed-experts` writes
        compressed_run(src, out, num_compressed=1, log=lambda m: None)
        return out
    from jmoe.merge.staging import staged_dir
    from jmoe.train import rundir

    cfg, tc, params, state, saved, at = rundir.load_run(src)
    with staged_dir(out) as tmp:
        rundir.save_model_run(tmp, variant_config(cfg, variant), tc, jax.tree.map(np.asarray, params), state, at,
                              saved.get("data", {}))
    return out


def active_params(cfg, variant: str) -> int:
    """Parameters a token computes with: everything but the routed experts, plus the share of
    its top-k experts the variant runs (full: all, compressed: k - 1, drop: one)."""
    from jmoe.nn import init_lm

    shapes = jax.eval_shape(lambda: init_lm(jax.random.key(0), cfg))
    total = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
    expert = sum(int(np.prod(shapes["layers"][str(i)]["moe"]["experts"][w].shape)) for i in cfg.moe_layers
                 for w in ("w_gate", "w_up", "w_down"))
    vectors = sum(int(np.prod(a.shape)) for i in cfg.moe_layers
                  for a in jax.tree.leaves(shapes["layers"][str(i)]["moe"]["experts"])) - expert
    per_expert = expert / sum(cfg.moe_for(i).num_experts for i in cfg.moe_layers)
    k = float(np.mean([cfg.moe_for(i).top_k for i in cfg.moe_layers]))
    runs = {"full": k, "compressed": k * active_expert_fraction(cfg), "drop": 1.0}[variant]
    return int(round(total - expert - vectors + len(cfg.moe_layers) * runs * per_expert))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _zoo.task_mixture_args(ap, examples=100)
    ap.add_argument("--ft-steps", type=int, default=200, help="fine-tuning steps of every variant")
    a = _zoo.parse_seeded(ap, argv)
    log = lambda m: print(m, flush=True)
    tasks, algorithmic, runs = _zoo.task_mixture_moe(a.steps, a.seeds)
    data = _zoo.task_mixture_spec(tasks)

    em = {v: [] for v in VARIANTS}
    val = {v: [] for v in VARIANTS}
    per_task = {v: [] for v in VARIANTS}
    active = {}
    for s, run in zip(a.seeds, runs):
        src = Path(run["dir"])
        for v in VARIANTS:
            start = start_run(src, v)
            cfg = LMConfig.from_dict(json.loads((start / "config.json").read_text())["model"])
            active[v] = active_params(cfg, v)
            tc = _zoo.tiny_train(a.ft_steps, s, lr=LR, warmup_steps=WARMUP, init_from=str(start.absolute()))
            ft = _zoo.run(f"ce_ft_{v}", cfg, tc, data)
            out = cached(_zoo.RUNS, "ce_score", {"model": ft["dir"], "examples": a.examples},
                         lambda d=ft["dir"]: {r.task: r.value for r in evals.evaluate(
                             open_model(d).load(), algorithmic, examples=a.examples, split="test", seed=0)})
            per_task[v].append(out)
            em[v].append(float(np.mean([out[t.name] for t in algorithmic])))
            val[v].append(ft["summary"]["val_loss"])
            log(f"   seed {s} {v}: exact match {em[v][-1]:.3f}, val loss {val[v][-1]:.4f}")

    claims = [
        _zoo.claim("compressed experts keep over 90% of the full model's exact match", "compressed", em["compressed"],
                   "0.9 x full", [0.9 * x for x in em["full"]], higher_is_better=True),
        _zoo.claim("compressed experts beat dropping the second expert (exact match)", "compressed",
                   em["compressed"], "drop", em["drop"], higher_is_better=True),
        _zoo.claim("compressed experts beat dropping the second expert (validation loss)", "compressed",
                   val["compressed"], "drop", val["drop"], higher_is_better=False),
    ]
    _zoo.print_claims(claims)
    recovered = [(c - d) / (f - d) if f != d else None for c, d, f in zip(em["compressed"], em["drop"], em["full"])]
    log("active parameters per token: " + ", ".join(f"{v} {active[v] / 1e6:.3f}M" for v in VARIANTS)
        + "; share of the full model's lead over the drop that compressed recovers, per seed: "
        + ", ".join("n/a" if r is None else f"{r:.0%}" for r in recovered))

    plt = _zoo.plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    colors = ["#999", "#4c72b0", "#dd8452"]
    for ax, values, label in ((axes[0], em, "mean exact match (± sd)"), (axes[1], val, "validation loss (± sd)")):
        ax.bar(VARIANTS, [np.mean(values[v]) for v in VARIANTS], yerr=[np.std(values[v], ddof=1) for v in VARIANTS],
               capsize=4, color=colors)
        ax.set(ylabel=label)
    axes[1].set_ylim(min(min(v) for v in val.values()) - 0.05, None)
    for i, v in enumerate(VARIANTS):
        axes[0].annotate(f"{active[v] / 1e6:.2f}M active", (i, 0), ha="center", va="bottom", fontsize=8, color="white")
    fig.suptitle(f"compressed experts, tiny task-mixture MoE, {a.ft_steps} fine-tuning steps, {len(a.seeds)} seeds")
    payload = _zoo.payload("compressed_experts", a.steps, a.seeds, claims, ft_steps=a.ft_steps, lr=LR,
                           examples=a.examples, tasks=[t.name for t in algorithmic], exact_match=em, val_loss=val,
                           per_task=per_task, active_params=active, recovered=recovered)
    payload["command"] += f" --ft-steps {a.ft_steps} --examples {a.examples}"
    _zoo.save("compressed_experts", payload, fig)


if __name__ == "__main__":
    main()
