"""Shared harness of the routing experiments: tiny-preset variants, same steps and seeds.

Each variant trains with `jmoe.train.train` into experiments/results/zoo_runs/<name>-<hash>,
where the hash covers the whole model and training configuration and the code version
(`_harness.code_version`); a finished run with the same configuration and code is reused, so
experiments that share a baseline train it once, and a change to jmoe retrains.

Every variant is named in `VARIANTS` and trained with the seeds of `_harness.SEEDS` (0, 1, 2);
a claim compares per-seed values paired by seed (`claim`). To train variants ahead of their
reports (e.g. in slices of a long session):

    python experiments/_zoo.py top2 dense aux_free --seeds 0 1 2
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from _harness import SEEDS, code_version, config_key
from jmoe import fine_grained
from jmoe.data import eval_batches, load_corpus
from jmoe.evals.stats import difference_verdict, goal_verdict, paired_difference, summary
from jmoe.nn import LMConfig, preset
from jmoe.nn.attention import AttentionConfig
from jmoe.train import TrainConfig, read_metrics, train

# The code version of every run of the harness: the jmoe modules imported above, taken once (an
# experiment that imports more of jmoe afterwards keeps the same keys for the shared runs).
CODE_VERSION = code_version()
RESULTS = Path(__file__).parent / "results"
RUNS = RESULTS / "zoo_runs"
_CORPORA = {}


def corpus(data: str | None = None):
    """The training corpus of a data spec (None: the embedded corpus), loaded once."""
    if data not in _CORPORA:
        _CORPORA[data] = load_corpus(data)
    return _CORPORA[data]


def tiny(**moe_changes) -> LMConfig:
    model = preset("tiny")["model"]
    return model.replace(moe=model.moe.replace(**moe_changes)) if moe_changes else model


def tiny_train(steps: int, seed: int, **changes) -> TrainConfig:
    return TrainConfig(**{**preset("tiny")["train"], "steps": steps, "seed": seed, **changes})


def task_mixture_moe(steps: int, seeds) -> tuple[list, list, list[dict]]:
    """(the evaluation suite's tasks, its algorithmic ones, one run per seed of the tiny MoE
    trained `steps` steps on the mixture of every task): task_mixture.py's MoE, which uoe.py,
    scmoe.py, rice.py and compressed_experts.py edit and decode."""
    from jmoe import evals

    tasks = evals.resolve_tasks("all")
    data = task_mixture_spec(tasks)
    runs = [run("tasks_moe", tiny(), tiny_train(steps, s), data) for s in seeds]
    return tasks, [t for t in tasks if t.kind == "exact_match"], runs


def task_mixture_spec(tasks) -> str:
    """The data spec of the mixture of `tasks` (what task_mixture_moe's runs train on)."""
    from jmoe.evals.mixture import mix_spec

    return mix_spec(",".join(t.name for t in tasks))


def task_mixture_args(ap, examples: int) -> None:
    """--steps (of the task-mixture MoE), --seeds and --examples (test examples per algorithmic task)."""
    ap.add_argument("--steps", type=int, default=600, help="training steps of the task-mixture MoE")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--examples", type=int, default=examples, help="test examples per algorithmic task")


def _fine(m: int) -> LMConfig:
    base = tiny()
    return base.replace(moe=fine_grained(base.moe, m, num_shared=1))


# Every model of the routing experiments, by name (the baseline "top2" is the tiny preset).
VARIANTS = {
    "top2": lambda: tiny(),
    "dense": lambda: tiny().replace(moe=None),
    "aux_free": lambda: tiny(router="sigmoid_bias", balance_loss="none", router_options=dict(bias_update_rate=1e-3)),
    "sigmoid_lbl": lambda: tiny(router="sigmoid_bias", router_options=dict(bias_update_rate=0.0)),
    "lbl_sequence": lambda: tiny(balance_scope="sequence"),
    "top_p": lambda: tiny(router="top_p", top_k=8, router_options=dict(threshold=0.4), entropy_loss_coef=1e-4),
    "null2": lambda: tiny(router="null_experts", router_options=dict(num_null_experts=2)),
    "null4": lambda: tiny(router="null_experts", router_options=dict(num_null_experts=4)),
    "null8": lambda: tiny(router="null_experts", router_options=dict(num_null_experts=8)),
    "moepp": lambda: tiny(router="moepp", router_options=dict(num_zero_experts=1, num_copy_experts=1,
                                                               num_constant_experts=2, gating_residual=True)),
    "fine1": lambda: _fine(1),
    "fine2": lambda: _fine(2),
    "fine4": lambda: _fine(4),
    "pregate": lambda: tiny(router="pregate"),
    "smha": lambda: tiny().replace(attention=AttentionConfig(head_top_k=2)),
    "heads2": lambda: tiny().replace(n_heads=2, d_head=32),
    # DeepSeek-like routing: 64 narrow experts, top-8, the same active FFN width as top2
    "e64": lambda: tiny(num_experts=64, top_k=8, d_ff=64),
}


def runs(name: str, steps: int, seeds=SEEDS) -> list[dict]:
    """`run` of variant `name` once per seed (same batches per seed for every variant)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return [run(name, VARIANTS[name](), tiny_train(steps, seed)) for seed in seeds]


def run(name: str, model: LMConfig, tc: TrainConfig, data: str | None = None) -> dict:
    """Train (or reuse) one variant on `data` (a `jmoe.data.load_corpus` spec; None: the
    embedded corpus); returns its summary, records and late-training stats."""
    # a task mixture's text comes from jmoe.evals' generators: its digest joins the key
    extra = [data, corpus(data).sha256] if data is not None else []
    key = config_key([model.to_dict(), tc.to_dict()] + extra, CODE_VERSION)[:10]
    done = sorted(p for p in RUNS.glob(f"*-{key}") if (p / "summary.json").exists()) if RUNS.exists() else []
    out = done[0] if done else RUNS / f"{name}-{key}"  # an identical configuration trained under any name
    if not (out / "summary.json").exists():
        import shutil

        from jmoe.train.rundir import checkpoint_steps

        resume = out.is_dir() and bool(checkpoint_steps(out))  # a run stopped part way continues exactly
        if not resume:
            shutil.rmtree(out, ignore_errors=True)
        print(f"== {'resuming' if resume else 'training'} {name} ({out.name})", flush=True)
        # the run records its data spec, so that commands reading it (jmoe quantize, compress) find its corpus
        train(model, tc if data is None else tc.replace(data=data), out, corpus=corpus(data), resume=resume, progress=False,
              log=lambda m: print("   " + m, flush=True))
    else:
        print(f"== reusing {name} ({out.name})", flush=True)
    records = read_metrics(out / "metrics.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    train_recs = [r for r in records if r["kind"] == "train"]
    late = train_recs[-min(100, len(train_recs)):]
    stats = {}
    for field in ("max_vio", "experts_per_token", "zero_compute", "router_entropy", "dropped"):
        if late and field in late[0]:
            stats[field] = np.mean([r[field] for r in late], axis=0).tolist()  # per layer
    return {"name": name, "dir": str(out), "model": model, "seed": tc.seed, "data": data, "summary": summary, "records": records,
            "late": stats}


def val_losses(results: list[dict]) -> list[float]:
    return [r["summary"]["val_loss"] for r in results]


def claim(text: str, a: str, a_values, b: str, b_values, *, higher_is_better: bool, margin: float | None = None) -> dict:
    """A claim about variant a against variant b, judged by the 95% interval of the per-seed
    difference a - b (`jmoe.evals.stats`).

    margin None: "a beats b" (reproduced when the interval excludes 0 on a's side). A margin:
    "a is no worse than b by more than margin" (reproduced when the whole interval is within
    the margin, not reproduced when it is wholly beyond it).
    """
    diff = paired_difference(a_values, b_values)
    if margin is None:
        verdict = difference_verdict(diff, higher_is_better=higher_is_better)
    else:
        bound = -margin if higher_is_better else margin
        verdict = goal_verdict(diff, bound, higher_is_better=higher_is_better)
    return {"claim": text, "a": a, "b": b, "a_summary": summary(a_values), "b_summary": summary(b_values),
            "difference": diff, "margin": margin, "higher_is_better": higher_is_better, "verdict": verdict}


def fmt_ci(s: dict, digits: int = 4) -> str:
    """"mean ± sd" of a `summary`."""
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def fmt_diff(d: dict, digits: int = 4) -> str:
    lo, hi = d["ci95"]
    return f"{d['mean']:+.{digits}f} (95% CI {lo:+.{digits}f}..{hi:+.{digits}f})"


def print_claims(claims: list[dict]) -> None:
    for c in claims:
        print(f"{c['claim']}: {c['a']} {fmt_ci(c['a_summary'])} vs {c['b']} {fmt_ci(c['b_summary'])}, "
              f"difference {fmt_diff(c['difference'])} -> {c['verdict']}")


def git_commit() -> str | None:
    """The checkout's commit (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=RESULTS.parent, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def payload(script: str, steps: int, seeds, claims: list[dict], **extra) -> dict:
    """The results JSON of a routing experiment: command, code version, seeds, claims."""
    seed_args = " ".join(str(s) for s in seeds)
    return {"command": f"python experiments/{script}.py --steps {steps} --seeds {seed_args}",
            "code_version": CODE_VERSION, "git_commit": git_commit(), "steps": steps, "seeds": list(seeds), "claims": claims, **extra}


def mean_curve(results: list[dict], field: str, width: int = 25):
    """(steps, mean over seeds of the smoothed layer-mean curve, min, max)."""
    curves = [smoothed(*curve(r, field), width=width) for r in results]
    n = min(len(c[1]) for c in curves)
    vals = np.stack([c[1][:n] for c in curves])
    return curves[0][0][:n], vals.mean(0), vals.min(0), vals.max(0)


def plot_mean(ax, results: list[dict], field: str, label: str) -> None:
    steps, mean, lo, hi = mean_curve(results, field)
    line, = ax.plot(steps, mean, label=label)
    ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)


def curve(result: dict, field: str, layer_mean: bool = True):
    recs = [r for r in result["records"] if r["kind"] == "train" and field in r]
    steps = [r["step"] for r in recs]
    vals = [np.mean(r[field]) if layer_mean else r[field] for r in recs]
    return np.asarray(steps), np.asarray(vals)


def smoothed(steps, values, width=25):
    """(steps, moving average of values) aligned at the window ends."""
    width = max(1, min(width, len(values)))
    kernel = np.ones(width) / width
    return np.asarray(steps)[width - 1:], np.convolve(values, kernel, mode="valid")


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table: columns are (header, format string over the row dict)."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(fmt.format(**r) for _, fmt in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def save(name: str, payload: dict, fig) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    print(f"wrote {RESULTS / (name + '.json')} and {RESULTS / (name + '.png')}")


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


_TOKEN_ROUTING = {}


def token_routing(result: dict, batches: int = 4) -> dict:
    """A trained variant on fixed validation batches, token by token: "loss" [N] (nats, the
    next-byte cross-entropy), "bytes" [N] (the input byte), and per MoE layer "first" [L, N]
    (the token's first expert) and "ffn_experts" [L, N] (how many FFN experts it was
    computed by: selected slots with ids below E)."""
    import jax
    import jax.numpy as jnp

    from jmoe.nn import lm_apply
    from jmoe.train import load_run

    if (result["dir"], batches) in _TOKEN_ROUTING:  # computed once per run (a baseline serves several claims)
        return _TOKEN_ROUTING[(result["dir"], batches)]
    model, tc, params, router_state, _, _ = load_run(result["dir"])
    E = model.moe.num_ffn_choices

    @jax.jit
    def fn(p, inputs, targets):
        logits, aux = lm_apply(p, inputs, model, state=router_state)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        loss = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0].reshape(-1)
        first = jnp.stack([a.routing.expert_ids[:, 0] for a in aux.moe])
        ffn = jnp.stack([jnp.sum(a.routing.mask & (a.routing.expert_ids < E), axis=-1) for a in aux.moe])
        return loss, first, ffn

    out = {"loss": [], "bytes": [], "first": [], "ffn_experts": []}
    for b in eval_batches(corpus(result.get("data")).val, batches, tc.batch_size, tc.seq_len):
        loss, first, ffn = fn(params, jnp.asarray(b[:, :-1]), jnp.asarray(b[:, 1:]))
        out["loss"].append(np.asarray(loss))
        out["bytes"].append(np.asarray(b[:, :-1]).reshape(-1))
        out["first"].append(np.asarray(first))
        out["ffn_experts"].append(np.asarray(ffn))
    _TOKEN_ROUTING[(result["dir"], batches)] = {k: np.concatenate(v, axis=-1) for k, v in out.items()}
    return _TOKEN_ROUTING[(result["dir"], batches)]


def specialisation(result: dict, batches: int = 4) -> list[float]:
    """Per MoE layer: mutual information (bits) between a token's first expert and the
    class of its byte (letter, digit, space, newline, punctuation, other), on validation text.
    Higher means experts specialise more on kinds of input."""
    tr = token_routing(result, batches)
    classes = _byte_class(tr["bytes"])
    return [_mutual_information(f, classes) for f in tr["first"]]


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy import stats

    return float(stats.spearmanr(a, b).statistic)


def _byte_class(b: np.ndarray) -> np.ndarray:
    out = np.full(b.shape, 5)
    out[(b >= ord("a")) & (b <= ord("z")) | (b >= ord("A")) & (b <= ord("Z")) | (b == ord("_"))] = 0
    out[(b >= ord("0")) & (b <= ord("9"))] = 1
    out[b == ord(" ")] = 2
    out[b == ord("\n")] = 3
    out[np.isin(b, np.frombuffer(b"()[]{}.,:;=+-*/%<>!&|^~@#'\"\\", np.uint8))] = 4
    return out


def _mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log2(joint[nz] / (pa @ pb)[nz])))


def dense_base_args(ap, *, preset: str, steps: int, steps_help: str, examples_help: str = "test examples per task"):
    """The options of the experiments built on a dense base and its fine-tunes (lora_experts,
    moe_build, merging_benchmark): --preset, --base-steps, --steps, --seeds, --examples,
    --train-only. Parse with `parse_seeded`."""
    ap.add_argument("--preset", default=preset, choices=["tiny", "small"])
    ap.add_argument("--base-steps", type=int, help="steps of the base (default: the preset's)")
    ap.add_argument("--steps", type=int, default=steps, help=steps_help)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--examples", type=int, default=200, help=examples_help)
    ap.add_argument("--train-only", action="store_true", help="train (or reuse) the runs, write no results")


def parse_seeded(ap, argv=None):
    """ap.parse_args(argv), refusing fewer than two seeds (no interval)."""
    a = ap.parse_args(argv)
    if len(a.seeds) < 2:
        ap.error("--seeds needs at least two seeds for an interval")
    return a


def args(argv=None, default_steps=600):
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=default_steps)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    return parse_seeded(ap, argv)


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="train routing-zoo variants ahead of their reports")
    ap.add_argument("variants", nargs="+", choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    a = ap.parse_args(argv)
    for name in a.variants:  # variant by variant: the first claims are complete first
        runs(name, a.steps, a.seeds)


__all__ = ["RESULTS", "SEEDS", "VARIANTS", "CODE_VERSION", "args", "claim", "curve", "fmt_ci", "fmt_diff", "mean_curve", "payload", "plot_mean",
           "plt", "print_claims", "run", "runs", "save", "smoothed", "spearman", "specialisation", "summary", "table", "token_routing", "tiny", "tiny_train",
           "val_losses"]


if __name__ == "__main__":
    main()
