"""Mowst at small scale: a weak expert (an MLP over the last few bytes) and the strong tiny
MoE, mixed by a confidence from the dispersion of the weak expert's prediction, against the
strong model fine-tuned alone for the same steps.

The tiny MoE trained on the mixture of every evaluation task (task_mixture.py's runs, shared
through the run cache) is the strong expert. Per seed:

  strong    the strong model fine-tuned --rounds x --strong-steps steps alone (cross-entropy
            plus its balance loss, AdamW at Mowst's learning rate and weight decay)
  mowst_w1  `jmoe mowst`: --rounds rounds of --weak-steps weak-turn and --strong-steps
            strong-turn steps, the weak expert reading the current byte only (the reference's
            MLP sees a node without its graph)
  mowst_w4  the same with a weak expert that reads the last 4 bytes

Scores on the mixture's validation windows (`jmoe.nn.mowst.mowst_scores`): the expected loss
of Mowst's random routing (the weak expert with probability C: what it trains on, the
reference's inference), the loss and the share of tokens that skip the strong model when
tokens with C >= threshold take the weak prediction, at thresholds 0.1 .. 0.9 (the plot).
Claims, paired by seed (the paper: Mowst matches or beats the strong expert alone): Mowst's
expected loss is no worse than the strong model's by more than 0.02, and at threshold 0.5 it
skips the strong model on some tokens with a loss within the same margin. Decoding: greedy
continuations of validation prompts with `jmoe.infer.mowst.MowstDecoder` (threshold 0.5)
against the plain engine, one prompt at a time: the share of generated tokens that skipped
the strong model, its calls per token, and the decode speed ratio. Writes
experiments/results/mowst.{json,png}; runs and scores are cached by configuration and code
version.

    python experiments/mowst.py [--steps 600] [--seeds 0 1 2] [--rounds 2] [--weak-steps 200] [--strong-steps 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

from jmoe.data import eval_batches, load_corpus  # noqa: E402
from jmoe.data.batches import train_batch  # noqa: E402
from jmoe.infer import Engine  # noqa: E402
from jmoe.infer.mowst import MowstDecoder  # noqa: E402
from jmoe.nn import lm_apply  # noqa: E402
from jmoe.nn.mowst import MowstConfig  # noqa: E402
from jmoe.nn.transformer import update_lm_state  # noqa: E402
from jmoe.train import rundir  # noqa: E402
from jmoe.train.mowst import WEIGHT_DECAY, evaluate_mowst, load_mowst, mowst_run  # noqa: E402
from jmoe.train.trainer import cross_entropy, evaluate  # noqa: E402

from _harness import cached, config_key  # noqa: E402

WINDOWS = {"mowst_w1": 1, "mowst_w4": 4}
VARIANTS = ("strong", *WINDOWS)
THRESHOLDS = [round(0.1 * i, 1) for i in range(1, 10)]
LR = 1e-3
PROMPTS, PROMPT_LEN, NEW_TOKENS = 16, 32, 32


def fine_tune_alone(cfg, params, state, batch, steps: int, lr: float):
    """The strong model trained `steps` steps alone, with the optimizer of Mowst's strong turns."""
    tx = optax.adamw(lr, weight_decay=WEIGHT_DECAY)

    @jax.jit
    def step(p, opt, st, tokens):
        def loss(p):
            logits, aux = lm_apply(p, tokens[:, :-1], cfg, state=st)
            return cross_entropy(logits, tokens[:, 1:]) + aux.moe_loss, aux

        (_, aux), g = jax.value_and_grad(loss, has_aux=True)(p)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, update_lm_state(st, aux.counts(cfg), cfg) if st else st

    opt = tx.init(params)
    for i in range(steps):
        params, opt, state = step(params, opt, state, jnp.asarray(batch(i)))
    return params, state


def prompts_of(val: np.ndarray) -> list[list[int]]:
    """PROMPTS validation windows' first PROMPT_LEN tokens."""
    flat = val.reshape(-1, val.shape[-1])
    rows = np.linspace(0, len(flat), PROMPTS, endpoint=False).astype(int)
    return [flat[r, :PROMPT_LEN].tolist() for r in rows]


def score_strong(src: Path, seed: int, steps: int) -> dict:
    cfg, tc, params, state, _, _ = rundir.load_run(src)
    corpus = load_corpus(tc.data)
    val = eval_batches(corpus.val, tc.eval_batches, tc.batch_size, tc.seq_len)
    params, state = fine_tune_alone(cfg, params, state or None, lambda i: train_batch(corpus.train, seed + 7919, i,
                                                                                      tc.batch_size, tc.seq_len),
                                    steps, LR)
    engine = Engine(cfg, params, state, batch_size=1)
    engine.generate(prompts_of(val)[:1], max_new_tokens=NEW_TOKENS)  # compile
    _, stats = engine.generate(prompts_of(val), max_new_tokens=NEW_TOKENS)
    return {"val_loss": evaluate(params, state, cfg, val)["val_loss"], "decode_tokens_per_s": stats.decode_tokens_per_s}


def score_mowst(src: Path, seed: int, window: int, a) -> dict:
    out = _zoo.RUNS / f"mowst_{window}-{config_key([str(src.absolute()), window, a.rounds, a.weak_steps, a.strong_steps, seed], _zoo.CODE_VERSION)[:10]}"
    if not (out / "report.json").exists():
        mowst_run(src, out, mcfg=MowstConfig(window=window), rounds=a.rounds, weak_steps=a.weak_steps,
                  strong_steps=a.strong_steps, lr=LR, strong_lr=LR, seed=seed, log=lambda m: print("   " + m, flush=True))
    cfg, tc, params, state, _, _ = rundir.load_run(out)
    mcfg, _, weak = load_mowst(out, cfg.vocab_size)
    val = eval_batches(load_corpus(tc.data).val, tc.eval_batches, tc.batch_size, tc.seq_len)
    sweep = {str(t): evaluate_mowst(cfg, params, state or None, weak, mcfg, val, t) for t in THRESHOLDS}
    dec = MowstDecoder(cfg, params, state, weak, mcfg, 0.5, batch_size=1)
    engine = Engine(cfg, params, state, batch_size=1)
    prompts = prompts_of(val)
    for run in (dec, engine):  # compile every shape first
        run.generate(prompts, max_new_tokens=NEW_TOKENS)
    best = {"mowst": None, "engine": None}
    for _ in range(3):  # side by side, the best of three each (a noisy machine)
        for name, run in (("mowst", dec), ("engine", engine)):
            _, stats = run.generate(prompts, max_new_tokens=NEW_TOKENS)
            if best[name] is None or stats.decode_tokens_per_s > best[name].decode_tokens_per_s:
                best[name] = stats
    stats = best["mowst"]
    return {"sweep": sweep, "decode": {**stats.to_dict(), "strong_calls_per_token": stats.strong_calls / stats.decode_tokens,
                                       "engine_decode_tokens_per_s": best["engine"].decode_tokens_per_s}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="training steps of the task-mixture MoE")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(_zoo.SEEDS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--weak-steps", type=int, default=200)
    ap.add_argument("--strong-steps", type=int, default=100)
    a = _zoo.parse_seeded(ap, argv)
    log = lambda m: print(m, flush=True)
    _, _, runs = _zoo.task_mixture_moe(a.steps, a.seeds)

    strong, results = [], {v: [] for v in WINDOWS}
    for s, run in zip(a.seeds, runs):
        src = Path(run["dir"])
        steps = a.rounds * a.strong_steps
        strong.append(cached(_zoo.RUNS, "mowst_strong", {"src": run["dir"], "steps": steps, "lr": LR, "seed": s},
                             lambda: score_strong(src, s, steps)))
        log(f"   seed {s} strong alone: val loss {strong[-1]['val_loss']:.4f}")
        for v, w in WINDOWS.items():
            r = cached(_zoo.RUNS, "mowst_score", {"src": run["dir"], "window": w, "rounds": a.rounds,
                                                  "weak": a.weak_steps, "strong": a.strong_steps, "seed": s},
                       lambda w=w: score_mowst(src, s, w, a))
            results[v].append(r)
            half = r["sweep"]["0.5"]
            log(f"   seed {s} {v}: expected loss {half['expected_loss']:.4f} ({half['expected_skip']:.1%} weak), "
                f"threshold 0.5 loss {half['threshold_loss']:.4f} ({half['threshold_skip']:.1%} skip); decoding "
                f"{r['decode']['skip_share']:.1%} skip, {r['decode']['strong_calls_per_token']:.2f} strong calls/token")

    base = [x["val_loss"] for x in strong]
    expected = {v: [r["sweep"]["0.5"]["expected_loss"] for r in results[v]] for v in WINDOWS}
    at_half = {v: [r["sweep"]["0.5"]["threshold_loss"] for r in results[v]] for v in WINDOWS}
    skip = {v: [r["sweep"]["0.5"]["threshold_skip"] for r in results[v]] for v in WINDOWS}
    claims = []
    for v in WINDOWS:
        claims.append(_zoo.claim(f"Mowst ({v}, random routing) keeps the strong model's loss", v, expected[v],
                                 "strong", base, higher_is_better=False, margin=0.02))
        claims.append(_zoo.claim(f"Mowst ({v}) at threshold 0.5 keeps the strong model's loss", v, at_half[v],
                                 "strong", base, higher_is_better=False, margin=0.02))
    _zoo.print_claims(claims)
    decode = {v: {k: [r["decode"][k] for r in results[v]] for k in
                  ("skip_share", "strong_calls_per_token", "decode_tokens_per_s", "engine_decode_tokens_per_s")}
              for v in WINDOWS}
    for v in WINDOWS:
        d = decode[v]
        ratio = [m / e for m, e in zip(d["decode_tokens_per_s"], d["engine_decode_tokens_per_s"])]
        d["speed_ratio"] = ratio
        log(f"{v}: teacher-forced skip at 0.5 {np.mean(skip[v]):.1%}; decoding skip {np.mean(d['skip_share']):.1%}, "
            f"{np.mean(d['strong_calls_per_token']):.2f} strong calls per token, decode speed x{np.mean(ratio):.2f} "
            "of the plain engine (one prompt at a time)")

    plt = _zoo.plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for v, color in zip(WINDOWS, ("#4c72b0", "#dd8452")):
        xs = [np.mean([r["sweep"][str(t)]["threshold_skip"] for r in results[v]]) for t in THRESHOLDS]
        ys = [np.mean([r["sweep"][str(t)]["threshold_loss"] for r in results[v]]) for t in THRESHOLDS]
        ax.plot(xs, ys, "o-", color=color, label=f"{v}: threshold 0.1 .. 0.9")
        ax.scatter([np.mean([r["sweep"]["0.5"]["expected_skip"] for r in results[v]])], [np.mean(expected[v])],
                   marker="*", s=120, color=color, label=f"{v}: random routing (expected)")
    ax.axhline(np.mean(base), color="#999", ls="--", label="strong model fine-tuned alone")
    ax.set(xlabel="share of tokens that skip the strong model", ylabel="validation loss (mean of seeds)")
    ax.legend(fontsize=8)
    fig.suptitle(f"Mowst on the tiny task-mixture MoE, {len(a.seeds)} seeds")
    payload = _zoo.payload("mowst", a.steps, a.seeds, claims, rounds=a.rounds, weak_steps=a.weak_steps,
                           strong_steps=a.strong_steps, lr=LR, strong_val_loss=base,
                           sweep={v: [r["sweep"] for r in results[v]] for v in WINDOWS}, decode=decode)
    payload["command"] += f" --rounds {a.rounds} --weak-steps {a.weak_steps} --strong-steps {a.strong_steps}"
    _zoo.save("mowst", payload, fig)


if __name__ == "__main__":
    main()
