"""Shared harness of the routing experiments: tiny-preset variants, same steps and seed.

Each variant trains with `jmoe.train.train` into experiments/results/zoo_runs/<name>-<hash>,
where the hash covers the whole model and training configuration and the code version
(`_harness.code_version`); a finished run with the same configuration and code is reused, so
experiments that share a baseline train it once, and a change to jmoe retrains.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from _harness import config_key
from jmoe.data import eval_batches, load_corpus
from jmoe.nn import LMConfig, preset
from jmoe.train import TrainConfig, read_metrics, train

RESULTS = Path(__file__).parent / "results"
RUNS = RESULTS / "zoo_runs"
_CORPUS = None


def corpus():
    global _CORPUS
    if _CORPUS is None:
        _CORPUS = load_corpus(None)
    return _CORPUS


def tiny(**moe_changes) -> LMConfig:
    model = preset("tiny")["model"]
    return model.replace(moe=model.moe.replace(**moe_changes)) if moe_changes else model


def tiny_train(steps: int, seed: int, **changes) -> TrainConfig:
    return TrainConfig(**{**preset("tiny")["train"], "steps": steps, "seed": seed, **changes})


def run(name: str, model: LMConfig, tc: TrainConfig) -> dict:
    """Train (or reuse) one variant; returns its summary, records and late-training stats."""
    key = config_key([model.to_dict(), tc.to_dict()])[:10]
    done = sorted(p for p in RUNS.glob(f"*-{key}") if (p / "summary.json").exists()) if RUNS.exists() else []
    out = done[0] if done else RUNS / f"{name}-{key}"  # an identical configuration trained under any name
    if not (out / "summary.json").exists():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        print(f"== training {name} ({out.name})", flush=True)
        train(model, tc, out, corpus=corpus(), progress=False, log=lambda m: print("   " + m, flush=True))
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
    return {"name": name, "dir": str(out), "model": model, "summary": summary, "records": records, "late": stats}


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


def specialisation(result: dict, batches: int = 4) -> list[float]:
    """Per MoE layer: mutual information (bits) between a token's first expert and the
    class of its byte (letter, digit, space, newline, punctuation, other), on validation text.
    Higher means experts specialise more on kinds of input."""
    import jax
    import jax.numpy as jnp

    from jmoe.nn import lm_apply
    from jmoe.train import load_run

    model, tc, params, router_state, _, _ = load_run(result["dir"])
    val = eval_batches(corpus().val, batches, tc.batch_size, tc.seq_len)
    fn = jax.jit(lambda p, t: [a.routing.expert_ids[:, 0] for a in lm_apply(p, t, model, state=router_state)[1].moe])
    classes = []
    firsts = None
    for b in val:
        tokens = b[:, :-1]
        ids = fn(params, jnp.asarray(tokens))
        firsts = [np.asarray(i) for i in ids] if firsts is None else [np.concatenate([f, np.asarray(i)]) for f, i in zip(firsts, ids)]
        classes.append(_byte_class(tokens.reshape(-1)))
    classes = np.concatenate(classes)
    return [_mutual_information(f, classes) for f in firsts]


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


def args(argv=None, default_steps=600):
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=default_steps)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


__all__ = ["RESULTS", "args", "curve", "plt", "run", "save", "smoothed", "specialisation", "table", "tiny", "tiny_train"]
