"""Training a Mowst model (`jmoe.nn.mowst`) on top of a trained language model, and the
run it is written as (`jmoe mowst`).

Training alternates, as the reference's `train_mowst`, between
  a weak turn    the weak expert and the gate minimise the expected loss
                 mean(C * NLL_weak + (1 - C) * NLL_strong), the strong model frozen;
  a strong turn  the strong model minimises the same loss (plus its MoE balance losses),
                 the weak expert and the gate frozen: it learns most where the weak one
                 is unsure (weight 1 - C).
Each side keeps its own AdamW state (weight decay 5e-4, the reference's) across rounds.

A Mowst run is a jmoe run (the strong model after its turns) with `mowst.safetensors` (the
weak expert and the gate, `init_mowst`'s tree, names "."-joined) and a "mowst" entry in
config.json (the `MowstConfig` and the confidence threshold to decode with). Every command
that reads runs reads it as its strong model alone; `jmoe generate --mowst` decodes with
both (`jmoe.infer.mowst`).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmoe.nn.mowst import MowstConfig, check_mowst_params, init_mowst, mowst_loss, mowst_scores, weak_outputs
from jmoe.nn.transformer import LMConfig, lm_apply, token_nll, update_lm_state

MOWST_FILE = "mowst.safetensors"
WEIGHT_DECAY = 5e-4


def _optimizer(lr: float):
    return optax.adamw(lr, weight_decay=WEIGHT_DECAY)


def make_mowst_steps(cfg: LMConfig, mcfg: MowstConfig, lr: float, strong_lr: float):
    """(weak optimizer, strong optimizer, weak step, strong step), the steps jitted:

      weak_step(mowst, opt, strong params, router state, tokens [B, S+1]) -> (mowst, opt, loss)
      strong_step(params, opt, router state, mowst, tokens, key) -> (params, opt, router state, loss)
    """
    weak_tx, strong_tx = _optimizer(lr), _optimizer(strong_lr)

    def weak_loss(mp, tokens, sp, st):
        logits, _ = lm_apply(sp, tokens[:, :-1], cfg, state=st)
        nll_s = jax.lax.stop_gradient(token_nll(logits, tokens[:, 1:]))
        wl, conf = weak_outputs(mp, tokens[:, :-1], mcfg)
        return mowst_loss(token_nll(wl, tokens[:, 1:]), nll_s, conf)

    def weak_step(mp, opt, sp, st, tokens):
        loss, g = jax.value_and_grad(weak_loss)(mp, tokens, sp, st)
        updates, opt = weak_tx.update(g, opt, mp)
        return optax.apply_updates(mp, updates), opt, loss

    def strong_loss(sp, tokens, st, mp, key):
        logits, aux = lm_apply(sp, tokens[:, :-1], cfg, state=st, key=key)
        wl, conf = jax.lax.stop_gradient(weak_outputs(mp, tokens[:, :-1], mcfg))
        loss = mowst_loss(token_nll(wl, tokens[:, 1:]), token_nll(logits, tokens[:, 1:]), conf)
        return loss + aux.moe_loss, (loss, aux)

    def strong_step(sp, opt, st, mp, tokens, key):
        (_, (loss, aux)), g = jax.value_and_grad(strong_loss, has_aux=True)(sp, tokens, st, mp, key)
        updates, opt = strong_tx.update(g, opt, sp)
        if st:
            st = update_lm_state(st, aux.counts(cfg), cfg)
        return optax.apply_updates(sp, updates), opt, st, loss

    return weak_tx, strong_tx, jax.jit(weak_step), jax.jit(strong_step)


def train_mowst(cfg: LMConfig, params: dict, state: dict | None, mowst: dict, mcfg: MowstConfig,
                batch: Callable[[int], np.ndarray], *, rounds: int = 2, weak_steps: int = 200, strong_steps: int = 100,
                lr: float = 1e-3, strong_lr: float = 1e-3, seed: int = 0,
                log: Callable[[str], None] | None = None) -> tuple[dict, dict | None, dict, list[dict]]:
    """Alternate `rounds` weak turns of `weak_steps` steps and strong turns of `strong_steps`
    steps (module docstring). batch(i) -> tokens [B, S+1] int32 gives step i's batch (steps
    are numbered across turns). Returns (strong params, router state, Mowst params, history:
    one {"round", "turn", "loss"} per turn, its mean loss)."""
    for name, v in (("rounds", rounds), ("weak_steps", weak_steps), ("strong_steps", strong_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}={v!r} must be an integer >= 0")
    for name, v in (("lr", lr), ("strong_lr", strong_lr)):
        if not v > 0:
            raise ValueError(f"{name}={v!r} must be > 0")
    check_mowst_params(mowst, cfg.vocab_size, mcfg)
    weak_tx, strong_tx, weak_step, strong_step = make_mowst_steps(cfg, mcfg, lr, strong_lr)
    state = state or {}
    weak_opt, strong_opt = weak_tx.init(mowst), strong_tx.init(params)
    key = jax.random.key(seed)
    history, i = [], 0
    for r in range(rounds):
        for turn, steps in (("weak", weak_steps), ("strong", strong_steps)):
            losses = []
            for _ in range(steps):
                tokens = jnp.asarray(batch(i))
                if turn == "weak":
                    mowst, weak_opt, loss = weak_step(mowst, weak_opt, params, state, tokens)
                else:
                    params, strong_opt, state, loss = strong_step(params, strong_opt, state, mowst, tokens,
                                                                  jax.random.fold_in(key, i))
                losses.append(loss)
                i += 1
            if steps:
                mean = float(np.mean(jax.device_get(losses)))
                if not np.isfinite(mean):
                    raise FloatingPointError(f"Mowst training diverged in round {r + 1}'s {turn} turn (loss {mean})")
                history.append({"round": r + 1, "turn": turn, "loss": mean})
                if log is not None:
                    log(f"round {r + 1}/{rounds} {turn} turn: {steps} steps, expected loss {mean:.4f}")
    return params, state or None, mowst, history


def evaluate_mowst(cfg: LMConfig, params: dict, state: dict | None, mowst: dict, mcfg: MowstConfig, val: np.ndarray,
                   threshold: float = 0.5) -> dict:
    """`mowst_scores` over validation batches val [N, B, S+1] (every next-token prediction)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r} must be in [0, 1]")
    parts = [_nlls(params, state, mowst, jnp.asarray(b), cfg, mcfg) for b in val]
    return mowst_scores(*(jnp.concatenate([p[j] for p in parts]) for j in range(3)), threshold)


@partial(jax.jit, static_argnums=(4, 5))
def _nlls(params, state, mowst, tokens, cfg, mcfg):
    """(weak NLL, strong NLL, confidence), each [B, S], of tokens [B, S+1]: compiled once per
    shape and configs, with the weights as arguments (a threshold sweep reuses it)."""
    logits, _ = lm_apply(params, tokens[:, :-1], cfg, state=state)
    wl, conf = weak_outputs(mowst, tokens[:, :-1], mcfg)
    return token_nll(wl, tokens[:, 1:]), token_nll(logits, tokens[:, 1:]), conf


# ------------------------------------------------------------------ runs


def save_mowst(run_dir: str | Path, mowst: dict) -> Path:
    """Write the weak expert and gate as `run_dir`/mowst.safetensors."""
    from jmoe.io.safetensors import save_safetensors

    out = Path(run_dir) / MOWST_FILE
    save_safetensors(jax.tree.map(np.asarray, mowst), out, metadata={"format": "jmoe-mowst"})
    return out


def read_mowst_config(run_dir: str | Path) -> tuple[MowstConfig, float]:
    """(MowstConfig, threshold) of a Mowst run; ValueError (one line) when `run_dir` is not one."""
    from jmoe.train import rundir

    entry = rundir.read_run_config(run_dir).get("mowst")
    if entry is None or not (Path(run_dir) / MOWST_FILE).is_file():
        raise ValueError(f"{run_dir} is not a Mowst run (no {MOWST_FILE}; make one with jmoe mowst)")
    try:
        mcfg = MowstConfig.from_dict(entry["config"])
        threshold = float(entry["threshold"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{run_dir}/config.json: bad mowst entry ({e})") from None
    return mcfg, threshold


def load_mowst(run_dir: str | Path, vocab_size: int) -> tuple[MowstConfig, float, dict]:
    """(MowstConfig, threshold, Mowst params) of a Mowst run, checked against `init_mowst`."""
    from jmoe.io.safetensors import load_safetensors

    mcfg, threshold = read_mowst_config(run_dir)
    tree: dict = {}
    try:
        flat = load_safetensors(Path(run_dir) / MOWST_FILE, lazy=False)
    except Exception as e:  # noqa: BLE001 - a corrupt file is the user's input
        raise ValueError(f"{run_dir}/{MOWST_FILE} does not load: {e}") from None
    for name, value in flat.items():
        *keys, last = name.split(".")
        node = tree
        for k in keys:
            node = node.setdefault(k, {})
        node[last] = jnp.asarray(value)
    check_mowst_params(tree, vocab_size, mcfg)
    return mcfg, threshold, tree


def mowst_run(ckpt: str | Path, out: str | Path, *, mcfg: MowstConfig = MowstConfig(), rounds: int = 2,
              weak_steps: int = 200, strong_steps: int = 100, lr: float = 1e-3, strong_lr: float = 1e-3,
              threshold: float = 0.5, step: int | None = None, seed: int = 0,
              log: Callable[[str], None] = print) -> dict:
    """Train a Mowst model on run `ckpt` (on the corpus and batch shape it trained with) and
    write it as run `out` with a report: the validation scores (`mowst_scores`) of the strong
    model alone before and of the Mowst model after. Everything is checked before the run's
    weights are read."""
    from jmoe.data import eval_batches, load_corpus
    from jmoe.data.batches import train_batch
    from jmoe.editing.run import editable_run
    from jmoe.merge.staging import staged_dir
    from jmoe.train import rundir

    if not isinstance(mcfg, MowstConfig):
        raise ValueError(f"mcfg must be a MowstConfig, got {type(mcfg).__name__}")
    for name, v in (("--rounds", rounds), ("--weak-steps", weak_steps), ("--strong-steps", strong_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} {v!r} must be an integer >= 0")
    if rounds < 1 or weak_steps < 1:
        raise ValueError("Mowst needs --rounds >= 1 and --weak-steps >= 1 (the weak expert and gate must train)")
    for name, v in (("--lr", lr), ("--strong-lr", strong_lr)):
        if not v > 0:
            raise ValueError(f"{name} {v!r} must be > 0")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold {threshold!r} must be in [0, 1]")
    out, cfg = editable_run(ckpt, out, "train Mowst on")
    if "mowst" in rundir.read_run_config(ckpt):
        raise ValueError(f"{ckpt} is a Mowst run already; train on its source run")
    t0 = time.perf_counter()
    cfg, tc, params, router_state, saved, at = rundir.load_run(ckpt, step)
    corpus = load_corpus(tc.data)
    val = eval_batches(corpus.val, tc.eval_batches, tc.batch_size, tc.seq_len)
    mowst = init_mowst(jax.random.key(seed), cfg.vocab_size, mcfg)
    before = evaluate_mowst(cfg, params, router_state or None, mowst, mcfg, val, threshold)
    log(f"training Mowst on {ckpt}: {rounds} rounds of {weak_steps} weak and {strong_steps} strong steps")
    params, router_state, mowst, history = train_mowst(
        cfg, params, router_state or None, mowst, mcfg,
        lambda i: train_batch(corpus.train, seed + 7919, i, tc.batch_size, tc.seq_len), rounds=rounds,
        weak_steps=weak_steps, strong_steps=strong_steps, lr=lr, strong_lr=strong_lr, seed=seed, log=log)
    after = evaluate_mowst(cfg, params, router_state, mowst, mcfg, val, threshold)
    entry = {"config": mcfg.to_dict(), "threshold": threshold}
    report = {"source": str(Path(ckpt).absolute()), "step": at, "rounds": rounds, "weak_steps": weak_steps,
              "strong_steps": strong_steps, "lr": lr, "strong_lr": strong_lr, "seed": seed, **entry,
              "history": history, "strong_before": before["strong_loss"], "scores": after}
    with staged_dir(out) as tmp:
        rundir.save_model_run(tmp, cfg, tc, jax.tree.map(np.asarray, params), router_state,
                              at + rounds * strong_steps, saved.get("data", {}),
                              meta={"mowst_from": report["source"]}, mowst=entry)
        save_mowst(tmp, mowst)
        report["wall_s"] = time.perf_counter() - t0
        rundir.write_report(tmp, report)
    log(f"validation loss: strong alone {before['strong_loss']:.4f} before, {after['strong_loss']:.4f} after; "
        f"weak alone {after['weak_loss']:.4f}; Mowst {after['expected_loss']:.4f} (random routing, "
        f"{after['expected_skip']:.1%} of tokens skip the strong model), {after['threshold_loss']:.4f} at "
        f"threshold {threshold} ({after['threshold_skip']:.1%} skip); wrote {out}")
    return report

