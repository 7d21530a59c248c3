"""An MoE model built from dense fine-tunes (`jmoe moe-build`), before and after a router-only fine-tune; BAM against BTX.

The dense base of lora_experts.py (the `tiny` or `small` preset without MoE layers, trained on
the evaluation suite's text domains) is fine-tuned in full on each algorithmic task of the
suite. `jmoe moe-build` then makes the fine-tunes' FFNs the experts of one MoE model, router
rows from the base's hidden states on each task's training prompts (mergekit's `hidden`
gates), top-2, in four recipes:

  built          mergekit-moe's: attention, norms and embeddings from the base
  btx            Branch-Train-MiX's: the same, averaged over the fine-tunes instead
  bam            BAM's: btx, and each fine-tune's attention an attention expert (soft-routed)
  bam_shared_kv  bam with the experts' keys and values averaged into shared ones

Scored by exact match on each task's test split:

  specialists   each task's own fine-tune, on that task (what the experts know)
  average       the fine-tunes' weights averaged (the merge that needs no router)
  built         the mergekit-moe model as built
  <recipe>+router  each recipe after the same router-only fine-tune on the task mixture

Claims, paired by seed: the router fine-tune improves the built model; the built model beats
the weight average; whether the tuned MoE keeps what the specialists know; and BAM's: its
attention experts beat BTX's averaged attention (both router-tuned alike). Writes
experiments/results/moe_build.{json,png}; runs are cached by configuration and code version.

    python experiments/moe_build.py --preset tiny
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402
import lora_experts  # noqa: E402

from jmoe import evals  # noqa: E402
from jmoe.evals.mixture import mix_spec  # noqa: E402
from jmoe.infer.load import Model, open_model  # noqa: E402
from jmoe.merge import moe_build  # noqa: E402
from jmoe.nn import preset  # noqa: E402
from jmoe.train import TrainConfig  # noqa: E402

from _harness import config_key  # noqa: E402

PROMPTS = 16  # training prompts per task for its router rows
RECIPES = {
    "built": {},
    "btx": {"non_expert_params": "average"},
    "bam": {"attention_experts": "full", "non_expert_params": "average"},
    "bam_shared_kv": {"attention_experts": "shared_kv", "non_expert_params": "average"},
}
MARGIN = 0.05  # "keeps what the specialists know": mean exact match at most this far below theirs


def specialist(base_run: dict, task: str, steps: int, seed: int, name: str | None = None) -> dict:
    """The base fine-tuned in full on `task` (a task name, or names joined by commas: their
    equal mixture); `name` names the run directory (default mb_ft_<task>)."""
    tc = TrainConfig(steps=steps, batch_size=16, seq_len=min(128, base_run["model"].max_seq_len), lr=1e-3,
                     warmup_steps=20, weight_decay=0.0, eval_every=steps, ckpt_every=steps, eval_batches=4, seed=seed,
                     init_from=str(Path(base_run["dir"]).absolute()))
    return _zoo.run(name or f"mb_ft_{task}", base_run["model"], tc, mix_spec(task))


def build(base_run: dict, fts: dict[str, dict], seed: int, top_k: int, recipe: str = "built") -> Path:
    """The MoE model of the fine-tunes in one of the `RECIPES` (built once per configuration
    and code version)."""
    config = {
        "base_model": str(Path(base_run["dir"]).absolute()), "gate_mode": "hidden", "experts_per_token": top_k,
        **RECIPES[recipe],
        "experts": [{"source_model": str(Path(r["dir"]).absolute()),
                     "positive_prompts": [ex.prompt for ex in evals.resolve_tasks(task)[0].examples("train", PROMPTS,
                                                                                                     seed=seed)]}
                    for task, r in fts.items()],
    }
    out = _zoo.RUNS / f"mb_built-{config_key(config, _zoo.CODE_VERSION)[:10]}"
    if not (out / "moe_build_report.json").exists():
        _zoo.RUNS.mkdir(parents=True, exist_ok=True)
        path = out.with_suffix(".yml")
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        print(f"== building {out.name}", flush=True)
        moe_build.build_moe(path, out, force=True, seed=seed, log=lambda m: print("   " + m, flush=True))
    else:
        print(f"== reusing {out.name}", flush=True)
    return out


def router_tune(built: Path, steps: int, seed: int, data: str) -> dict:
    model = open_model(built).cfg
    tc = TrainConfig(steps=steps, batch_size=16, seq_len=min(128, model.max_seq_len), lr=1e-3, warmup_steps=10,
                     weight_decay=0.0, eval_every=steps, ckpt_every=steps, eval_batches=4, seed=seed,
                     init_from=str(built.absolute()), train_only=("router",))
    return _zoo.run("mb_router", model, tc, data)


def averaged(fts: list[dict]) -> Model:
    import jax

    models = [open_model(r["dir"]).load() for r in fts]
    params = jax.tree.map(lambda *xs: np.mean([np.asarray(x, np.float32) for x in xs], axis=0), *[m.params for m in models])
    return Model(cfg=models[0].cfg, params=params, state=models[0].state, tokenizer=models[0].tokenizer, source="average")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _zoo.dense_base_args(ap, preset="tiny", steps=300, steps_help="steps of each task's full fine-tune")
    ap.add_argument("--router-steps", type=int, default=100, help="steps of the router-only fine-tune")
    ap.add_argument("--top-k", type=int, default=2)
    a = _zoo.parse_seeded(ap, argv)
    suite = evals.resolve_tasks("all")
    texts = [t for t in suite if t.kind == "bits_per_byte"]
    tasks = [t for t in suite if t.kind == "exact_match"]
    text_spec, task_spec = mix_spec(",".join(t.name for t in texts)), mix_spec(",".join(t.name for t in tasks))
    base_steps = a.base_steps or preset(a.preset)["train"]["steps"]
    bases = {s: lora_experts.base(a.preset, base_steps, s, text_spec) for s in a.seeds}
    fts = {s: {t.name: specialist(bases[s], t.name, a.steps, s) for t in tasks} for s in a.seeds}
    built = {r: {s: build(bases[s], fts[s], s, a.top_k, r) for s in a.seeds} for r in RECIPES}
    tuned = {r: {s: router_tune(built[r][s], a.router_steps, s, task_spec) for s in a.seeds} for r in RECIPES}
    if a.train_only:
        return

    def score(model) -> dict:
        return {x.task: x.value for x in evals.evaluate(model, tasks, examples=a.examples, split="test", seed=0)}

    scores = {k: [] for k in ("specialists", "average", "built", *(f"{r}+router" for r in RECIPES))}
    routing = []
    for s in a.seeds:
        own = {t.name: score(open_model(fts[s][t.name]["dir"]).load())[t.name] for t in tasks}
        row = {"specialists": own, "average": score(averaged(list(fts[s].values()))),
               "built": score(open_model(built["built"][s]).load()),
               **{f"{r}+router": score(open_model(tuned[r][s]["dir"]).load()) for r in RECIPES}}
        for k, v in row.items():
            scores[k].append(v)
            print(f"   seed {s} {k}: " + ", ".join(f"{t} {x:.3f}" for t, x in v.items()), flush=True)
        routing.append(json.loads((built["built"][s] / "moe_build_report.json").read_text())["prompt_routing"])
    mean = lambda rows: [float(np.mean([row[t.name] for t in tasks])) for row in rows]
    claims = [
        _zoo.claim("mean exact match: the router-only fine-tune improves the built MoE", "built+router",
                   mean(scores["built+router"]), "built", mean(scores["built"]), higher_is_better=True),
        _zoo.claim("mean exact match: the built MoE beats the weight average of the fine-tunes", "built",
                   mean(scores["built"]), "average", mean(scores["average"]), higher_is_better=True),
        _zoo.claim(f"mean exact match: the router-tuned MoE within {MARGIN:g} of the specialists on their own tasks",
                   "built+router", mean(scores["built+router"]), "specialists", mean(scores["specialists"]),
                   higher_is_better=True, margin=MARGIN),
        *(_zoo.claim(f"mean exact match (router-tuned): {r}'s attention experts beat btx's averaged attention", r,
                     mean(scores[f"{r}+router"]), "btx", mean(scores["btx+router"]), higher_is_better=True)
          for r in ("bam", "bam_shared_kv")),
        _zoo.claim("mean exact match (router-tuned): btx's averaged non-expert weights against the base's", "btx",
                   mean(scores["btx+router"]), "built", mean(scores["built+router"]), higher_is_better=True),
    ]
    _zoo.print_claims(claims)

    plt = _zoo.plt()
    fig, ax = plt.subplots(figsize=(2.2 * (len(tasks) + 1) + 2, 3.8))
    names = [t.name for t in tasks] + ["mean"]
    width = 0.8 / len(scores)
    for j, (k, rows) in enumerate(scores.items()):
        vals = np.asarray([[row[t.name] for t in tasks] + [np.mean([row[t.name] for t in tasks])] for row in rows])
        ax.bar(np.arange(len(names)) + j * width, vals.mean(0), width, yerr=vals.std(0), label=k, capsize=2)
    ax.set_xticks(np.arange(len(names)) + width * (len(scores) - 1) / 2, names)
    ax.set(ylabel="exact match (test)", title=f"MoE from {len(tasks)} dense fine-tunes ({a.preset} base), "
                                             f"{len(a.seeds)} seeds")
    ax.legend(fontsize=8)
    payload = _zoo.payload("moe_build", a.steps, a.seeds, claims, preset=a.preset, base_steps=base_steps,
                           router_steps=a.router_steps, top_k=a.top_k, examples=a.examples, recipes=RECIPES,
                           tasks=[t.name for t in tasks], scores=scores, prompt_routing=routing)
    payload["command"] += f" --preset {a.preset}"
    _zoo.save("moe_build", payload, fig)


if __name__ == "__main__":
    main()
