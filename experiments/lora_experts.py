"""LoRA against three mixtures of LoRA experts, multi-task fine-tuning of a frozen dense model.

A dense base (the `small` preset's shape without MoE layers, or `tiny`'s with --preset tiny)
is trained on the evaluation suite's text domains, then frozen. Each adapter is fine-tuned on
the equal-weight mixture of the suite's algorithmic tasks, at about equal trainable
parameters (on the FFN's gate, up and down projections):

  lora     rank E * r
  mixlora  E experts of rank r, top-2 (MixLoRA)
  smora    one LoRA of rank 23, 2 * r ranks active per token (SMoRA: its router over the
           ranks is as large as A, so rank 23 holds the parameters of a rank-32 LoRA)
  dynmole  E experts of rank r per projection, top-p 0.75, at least 2 (DynMoLE)

and scored by exact match on each task's test split; three seeds, claims paired by seed.
Claim (MixLoRA's): MixLoRA above LoRA on the mean exact match (and, finer grained, below it in
validation loss on the task mixture). Step time: see
experiments/bench_adapters.py. Writes experiments/results/lora_experts_<preset>.{json,png}; runs are
cached by configuration and code version (train in slices with --train-only).

    python experiments/lora_experts.py --preset tiny                  # the quick version
    python experiments/lora_experts.py                                # small base (long on CPU)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

from jmoe import adapters, evals  # noqa: E402,F401  (imported before the cache keys)
from jmoe.adapters import AdapterConfig  # noqa: E402
from jmoe.evals.mixture import mix_spec  # noqa: E402
from jmoe.infer.load import open_model  # noqa: E402
from jmoe.nn import preset  # noqa: E402
from jmoe.train import TrainConfig  # noqa: E402

E, R = 8, 4
ADAPTERS = {
    "lora": AdapterConfig(kind="lora", rank=E * R),
    "mixlora": AdapterConfig(kind="mixlora", rank=R, num_experts=E, top_k=2),
    # SMoRA's rank router is as large as A: rank 23 is LoRA's parameter count (+0.6% at tiny and small)
    "smora": AdapterConfig(kind="smora", rank=23, top_k=2 * R),
    "dynmole": AdapterConfig(kind="dynmole", rank=R, num_experts=E, top_k=2),
}


def base(name: str, steps: int, seed: int, text: str) -> dict:
    p = preset(name)
    model = p["model"].replace(moe=None)
    return _zoo.run(f"lora_base_{name}", model, TrainConfig(**{**p["train"], "steps": steps, "seed": seed}), text)


def finetune(kind: str, base_run: dict, steps: int, seed: int, data: str) -> dict:
    model = base_run["model"].replace(adapter=ADAPTERS[kind])
    tc = TrainConfig(steps=steps, batch_size=16, seq_len=min(128, model.max_seq_len), lr=3e-3, warmup_steps=30,
                     weight_decay=0.0, eval_every=steps, ckpt_every=max(steps // 2, 1), eval_batches=4, seed=seed,
                     base_from=str(Path(base_run["dir"]).absolute()))
    return _zoo.run(f"lora_{kind}", model, tc, data)


def trainable(kind: str, model) -> int:
    import jax

    tree = jax.eval_shape(lambda: adapters.init_adapters(jax.random.key(0), model.replace(adapter=ADAPTERS[kind])))
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _zoo.dense_base_args(ap, preset="small", steps=600, steps_help="fine-tuning steps")
    ap.add_argument("--adapters", nargs="+", default=list(ADAPTERS), choices=list(ADAPTERS))
    a = _zoo.parse_seeded(ap, argv)
    suite = evals.resolve_tasks("all")
    texts = [t for t in suite if t.kind == "bits_per_byte"]
    tasks = [t for t in suite if t.kind == "exact_match"]
    text_spec, task_spec = mix_spec(",".join(t.name for t in texts)), mix_spec(",".join(t.name for t in tasks))
    base_steps = a.base_steps or preset(a.preset)["train"]["steps"]
    # one base per seed: the seed of a comparison is the whole pipeline's
    bases = {s: base(a.preset, base_steps, s, text_spec) for s in a.seeds}
    runs = {k: [finetune(k, bases[s], a.steps, s, task_spec) for s in a.seeds] for k in a.adapters}
    if a.train_only:
        return
    scores = {k: [] for k in a.adapters}
    for k, rs in runs.items():
        for r in rs:
            model = open_model(r["dir"]).load()
            res = evals.evaluate(model, tasks, examples=a.examples, split="test", seed=0)
            scores[k].append({x.task: x.value for x in res})
            print(f"   {k} seed {r['seed']}: " + ", ".join(f"{x.task} {x.value:.3f}" for x in res), flush=True)
    frozen = []
    for s in a.seeds:
        res = evals.evaluate(open_model(bases[s]["dir"]).load(), tasks, examples=a.examples, split="test", seed=0)
        frozen.append({x.task: x.value for x in res})
    mean = lambda rows: [float(np.mean([row[t.name] for t in tasks])) for row in rows]
    claims = []
    if "lora" in scores:
        for k in (x for x in a.adapters if x != "lora"):
            claims.append(_zoo.claim(f"mean exact match over {len(tasks)} tasks: {k} beats lora", k, mean(scores[k]),
                                     "lora", mean(scores["lora"]), higher_is_better=True))
            claims.append(_zoo.claim(f"validation loss on the task mixture (nats/byte): {k} beats lora", k,
                                     _zoo.val_losses(runs[k]), "lora", _zoo.val_losses(runs["lora"]),
                                     higher_is_better=False))
            for t in tasks:
                claims.append(_zoo.claim(f"{t.name}: {k} beats lora", k, [row[t.name] for row in scores[k]], "lora",
                                         [row[t.name] for row in scores["lora"]], higher_is_better=True))
    _zoo.print_claims(claims)

    plt = _zoo.plt()
    fig, ax = plt.subplots(figsize=(1.6 * (len(tasks) + 1) + 2, 3.6))
    names = [t.name for t in tasks] + ["mean"]
    width = 0.8 / (len(a.adapters) + 1)
    rows = {"frozen base": frozen, **scores}
    for j, (k, rs) in enumerate(rows.items()):
        vals = np.asarray([[row[t.name] for t in tasks] + [np.mean([row[t.name] for t in tasks])] for row in rs])
        ax.bar(np.arange(len(names)) + j * width, vals.mean(0), width, yerr=vals.std(0) if len(rs) > 1 else None,
               label=k, capsize=2)
    ax.set_xticks(np.arange(len(names)) + width * len(rows) / 2 - width / 2, names)
    ax.set(ylabel="exact match (test)", title=f"adapters on a frozen dense {a.preset} model, {len(a.seeds)} seeds")
    ax.legend(fontsize=8)
    payload = _zoo.payload("lora_experts", a.steps, a.seeds, claims, preset=a.preset, base_steps=base_steps,
                           examples=a.examples, adapters={k: ADAPTERS[k].to_dict() for k in a.adapters},
                           trainable_params={k: trainable(k, bases[a.seeds[0]]["model"]) for k in a.adapters},
                           scores=scores, frozen_base=frozen, tasks=[t.name for t in tasks],
                           val_loss={k: _zoo.val_losses(rs) for k, rs in runs.items()})
    payload["command"] += f" --preset {a.preset}"
    _zoo.save(f"lora_experts_{a.preset}", payload, fig)
    print(json.dumps(payload["trainable_params"]))


if __name__ == "__main__":
    main()
