"""MoE vs dense on a mixture of the evaluation suite's tasks, and how experts specialise by task.

Trains the `tiny` preset (E=8, k=2, experts 256 wide) and its dense twin (FFN 512 = k * 256
wide: equal active parameters) on the equal-weight mixture of every task of `jmoe.evals`
(five algorithmic tasks in their prompt/answer format, three text domains), three seeds, then
scores both on each task's test split with `jmoe.evals.evaluate` (exact match of greedy
answers; bits per byte). Expert specialisation: the share of each task's routing slots that
go to each expert, per MoE layer (a heatmap), and the mutual information between a token's
task and its expert (bits; 0 when every task uses the experts alike).

Claims checked (paired by seed): MoE beats dense on each task and on the averages.
Writes experiments/results/task_mixture.{json,png}.

    python experiments/task_mixture.py [--steps 600] [--seeds 0 1 2] [--examples 200]
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

from jmoe import evals  # noqa: E402  (imported before the cache keys: the mixture corpus uses it)
from jmoe.evals.mixture import mix_spec  # noqa: E402
from jmoe.infer.load import open_model  # noqa: E402

VARIANTS = {"MoE": lambda: _zoo.tiny(), "dense": lambda: _zoo.tiny().replace(moe=None)}


def routing_shares(result: dict, tasks, windows: int = 16) -> np.ndarray:
    """[tasks, layers, E]: the share of each task's routing slots (test split, up to `windows`
    context windows) that select each FFN expert."""
    import jax
    import jax.numpy as jnp

    from jmoe.nn import lm_apply
    from jmoe.train import load_run

    model, tc, params, state, _, _ = load_run(result["dir"])
    E, S = model.moe.num_ffn_choices, model.max_seq_len

    @jax.jit
    def counts(p, tokens):
        _, aux = lm_apply(p, tokens, model, state=state)
        return jnp.stack([jnp.zeros(E).at[a.routing.expert_ids.reshape(-1)].add(
            a.routing.mask.reshape(-1).astype(jnp.float32), mode="drop") for a in aux.moe])

    out = []
    for task in tasks:
        if task.kind == "exact_match":
            text = "".join(ex.line for ex in task.examples("test", 400, seed=0, distinct=False)).encode()
        else:
            text = task.text("test")
        ids = np.frombuffer(text, np.uint8).astype(np.int32)
        n = min(windows, ids.size // S)
        c = np.asarray(counts(params, jnp.asarray(ids[: n * S].reshape(n, S))))
        out.append(c / c.sum(-1, keepdims=True))
    return np.stack(out)


def task_information(shares: np.ndarray) -> list[float]:
    """Per layer: mutual information (bits) between a slot's task (tasks equally likely) and
    its expert, from shares [tasks, layers, E]."""
    out = []
    for li in range(shares.shape[1]):
        p = shares[:, li, :] / shares.shape[0]  # joint p(task, expert)
        pt, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
        nz = p > 0
        out.append(float(np.sum(p[nz] * np.log2(p[nz] / (pt @ pe)[nz]))))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(_zoo.SEEDS))
    ap.add_argument("--examples", type=int, default=200, help="test examples per algorithmic task")
    ap.add_argument("--windows", type=int, default=32, help="test windows per text domain")
    a = ap.parse_args(argv)
    if len(a.seeds) < 2:
        ap.error("--seeds needs at least two seeds for an interval")
    tasks = evals.resolve_tasks("all")
    data = mix_spec(",".join(t.name for t in tasks))
    results = {v: [_zoo.run(f"tasks_{v.lower()}", make(), _zoo.tiny_train(a.steps, s), data) for s in a.seeds]
               for v, make in VARIANTS.items()}
    scores = {v: [] for v in VARIANTS}  # per variant, per seed: {task: value}
    for v, rs in results.items():
        for r in rs:
            model = open_model(r["dir"]).load()
            res = evals.evaluate(model, tasks, examples=a.examples, max_windows=a.windows, split="test", seed=0)
            scores[v].append({x.task: x.value for x in res})
            print(f"   {v} seed {r['seed']}: " + ", ".join(f"{x.task} {x.value:.3f}" for x in res), flush=True)
    claims = []
    for t in tasks:
        higher = t.kind == "exact_match"
        metric = "exact match" if higher else "bits/byte"
        claims.append(_zoo.claim(f"{t.name} ({metric}): MoE beats dense", "MoE", [s[t.name] for s in scores["MoE"]],
                                 "dense", [s[t.name] for s in scores["dense"]], higher_is_better=higher))
    for kind, label, higher in (("exact_match", "mean exact match", True), ("bits_per_byte", "mean bits/byte", False)):
        names = [t.name for t in tasks if t.kind == kind]
        claims.append(_zoo.claim(f"{label} over {len(names)} tasks: MoE beats dense", "MoE",
                                 [np.mean([s[n] for n in names]) for s in scores["MoE"]], "dense",
                                 [np.mean([s[n] for n in names]) for s in scores["dense"]], higher_is_better=higher))
    _zoo.print_claims(claims)

    shares = np.stack([routing_shares(r, tasks) for r in results["MoE"]])  # [seeds, tasks, layers, E]
    info = np.asarray([task_information(s) for s in shares])  # [seeds, layers]
    print("task-expert mutual information per layer (bits, mean over seeds): "
          + " / ".join(f"{x:.3f}" for x in info.mean(0)))

    plt = _zoo.plt()
    L, E = shares.shape[2], shares.shape[3]
    fig, axes = plt.subplots(1, L, figsize=(3.2 * L, 3.6), sharey=True)
    for li, ax in enumerate(np.atleast_1d(axes)):
        im = ax.imshow(shares[0, :, li, :], vmin=0, vmax=max(0.5, shares[0].max()), cmap="viridis", aspect="auto")
        ax.set(title=f"layer {li}: MI {info[0, li]:.2f} bits", xlabel="expert", xticks=range(E))
        ax.set_yticks(range(len(tasks)), [t.name for t in tasks])
    fig.colorbar(im, ax=axes, shrink=0.8, label="share of the task's slots (seed 0)")
    fig.suptitle("tiny MoE on the task mixture: routing share per task and expert")
    _zoo.RESULTS.mkdir(exist_ok=True)
    fig.savefig(_zoo.RESULTS / "task_mixture.png", dpi=110, bbox_inches="tight")
    import json

    payload = _zoo.payload("task_mixture", a.steps, a.seeds, claims, data=data, examples=a.examples,
                           windows=a.windows, scores=scores, routing_shares=shares.tolist(),
                           task_information=info.tolist(), tasks=[t.name for t in tasks])
    payload["command"] += f" --examples {a.examples}"
    (_zoo.RESULTS / "task_mixture.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {_zoo.RESULTS / 'task_mixture.json'} and {_zoo.RESULTS / 'task_mixture.png'}")


if __name__ == "__main__":
    main()
