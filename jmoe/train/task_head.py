"""Training a multi-task head (`jmoe.nn.task_head`) on a frozen language model over tasks of
the evaluation suite, and the run it is written as (`jmoe task-head`).

Each step's batch holds `rows` windows of every task's training text (its share of a task
mixture, `load_corpus(mix_spec(task))`), each row labelled with its task. The model's last
hidden state is computed with its weights frozen; only the head trains (AdamW), on next-token
cross-entropy through the model's own final norm and output projection.

The run is the model with the head in its parameters and `task_head` in its config (no task
chosen: every command reads it as the model it came from until a task is chosen; `jmoe
evaluate` scores each of the head's tasks with its own output).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmoe.nn.attention import rms_norm
from jmoe.nn.task_head import KINDS, TaskHeadConfig, head_config, head_params, init_task_head, task_head_deltas
from jmoe.nn.transformer import LMConfig, lm_hidden, token_nll, unembed

WEIGHT_DECAY = 0.01


def _row_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token NLL of each row: logits [B, S, V], targets [B, S] -> [B]."""
    return jnp.mean(token_nll(logits, targets), axis=-1)


def head_forward(cfg: LMConfig, params: dict, state: dict | None, head: dict, tokens: jax.Array,
                 task_ids: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
    """(per-row NLL of the model alone [B], with each row's task output [B], the head's stats)
    on tokens [B, S+1] with task_ids [B] (indices into cfg.task_head.tasks); the model's
    weights are constants."""
    x, _ = lm_hidden(params, tokens[:, :-1], cfg, state=state)
    x = jax.lax.stop_gradient(x)
    trunk = cfg.replace(task_head=None)
    y, stats = task_head_deltas(head, rms_norm(params["final_norm"], x, cfg.norm_eps), task_ids, cfg.task_head)
    targets = tokens[:, 1:]
    return (_row_nll(unembed(params, x, trunk), targets), _row_nll(unembed(params, x + y.astype(x.dtype), trunk), targets),
            stats)


def make_head_step(cfg: LMConfig, lr: float):
    """(optimizer, step): step(head, opt, params, state, tokens [B, S+1], task_ids [B]) ->
    (head, opt, loss), jitted."""
    tx = optax.adamw(lr, weight_decay=WEIGHT_DECAY)

    def loss_fn(head, params, state, tokens, task_ids):
        return jnp.mean(head_forward(cfg, params, state, head, tokens, task_ids)[1])

    @jax.jit
    def step(head, opt, params, state, tokens, task_ids):
        loss, g = jax.value_and_grad(loss_fn)(head, params, state, tokens, task_ids)
        updates, opt = tx.update(g, opt, head)
        return optax.apply_updates(head, updates), opt, loss

    return tx, step


def train_task_head(cfg: LMConfig, params: dict, state: dict | None, head: dict,
                    batch: Callable[[int], tuple[np.ndarray, np.ndarray]], *, steps: int = 300, lr: float = 1e-3,
                    log: Callable[[str], None] | None = None, log_every: int = 50) -> tuple[dict, list[dict]]:
    """Train `head` (cfg.task_head's parameters) `steps` steps; batch(i) -> (tokens [B, S+1]
    int32, task ids [B]). Returns (head, history: {"step", "loss"} every `log_every` steps,
    the mean loss since the last entry)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    if not lr > 0:
        raise ValueError(f"lr={lr!r} must be > 0")
    if cfg.task_head is None:
        raise ValueError("cfg has no task_head to train")
    tx, step = make_head_step(cfg, lr)
    opt = tx.init(head)
    history, losses = [], []
    for i in range(steps):
        tokens, ids = batch(i)
        head, opt, loss = step(head, opt, params, state, jnp.asarray(tokens), jnp.asarray(ids))
        losses.append(loss)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            mean = float(np.mean(jax.device_get(losses)))
            if not np.isfinite(mean):
                raise FloatingPointError(f"task head training diverged at step {i + 1} (loss {mean})")
            history.append({"step": i + 1, "loss": mean})
            losses = []
            if log is not None:
                log(f"step {i + 1}/{steps}: loss {mean:.4f}")
    return head, history


def evaluate_task_head(cfg: LMConfig, params: dict, state: dict | None, head: dict,
                       val: Sequence[np.ndarray]) -> dict:
    """Validation of the head: val holds one array of windows [N, B, S+1] per task, in the
    order of cfg.task_head.tasks.
    Returns {"tasks": {name: {"model_loss", "head_loss"}}, "model_loss", "head_loss" (means
    over tasks), "zero_share" (of the head's expert units), "gates" {name: mean gate weight
    of each expert its task mixes}}."""
    th = cfg.task_head
    if len(val) != len(th.tasks):
        raise ValueError(f"val has {len(val)} tasks' windows for {len(th.tasks)} tasks")
    out, zero = {}, []
    gates = {}
    for t, (name, windows) in enumerate(zip(th.tasks, val)):
        model, headed, g = [], [], []
        for b in windows:
            m, h, stats = _nlls(cfg, params, state, head, jnp.asarray(b), jnp.full((b.shape[0],), t, jnp.int32))
            model.append(np.asarray(m))
            headed.append(np.asarray(h))
            zero.append(float(stats["zero_share"]))
            g.append(np.asarray(stats["gates"])[th.tower(name)])
        out[name] = {"model_loss": float(np.mean(model)), "head_loss": float(np.mean(headed))}
        gates[name] = np.mean(g, axis=0).tolist()
    return {"tasks": out, "model_loss": float(np.mean([v["model_loss"] for v in out.values()])),
            "head_loss": float(np.mean([v["head_loss"] for v in out.values()])), "zero_share": float(np.mean(zero)),
            "gates": gates}


@partial(jax.jit, static_argnums=0)
def _nlls(cfg, params, state, head, tokens, task_ids):
    """`head_forward`, compiled once per shape and config with the weights as arguments."""
    return head_forward(cfg, params, state, head, tokens, task_ids)


# ------------------------------------------------------------------ runs


def task_corpora(tasks, log: Callable[[str], None] | None = None) -> list:
    """Each task's own corpus: its share of the equal mixture of `tasks` (the same bytes as in
    `load_corpus(mix_spec(names))`, which `jmoe train --tasks NAMES` trains on)."""
    from jmoe.evals.mixture import TRAIN_BYTES, VAL_BYTES, mix_spec, task_corpus

    out = []
    for i, task in enumerate(tasks):
        if log is not None:
            log(f"task {i + 1}/{len(tasks)}: {task.name}")
        out.append(task_corpus(mix_spec(task.name), train_bytes=TRAIN_BYTES // len(tasks),
                               val_bytes=VAL_BYTES // len(tasks)))
    return out


def task_batch(corpora, seed: int, index: int, rows: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Step `index`'s batch: `rows` training windows of every task ([T rows, S+1] tokens) and
    their task ids [T rows]."""
    from jmoe.data.batches import train_batch

    tokens = [train_batch(c.train, seed + 104729 * t, index, rows, seq_len) for t, c in enumerate(corpora)]
    return np.concatenate(tokens), np.repeat(np.arange(len(corpora), dtype=np.int32), rows)


def task_head_run(ckpt: str | Path, out: str | Path, *, tasks: str = "all", kind: str = "home",
                  hidden: int | None = None, experts: int = 8, steps: int = 300, lr: float = 1e-3,
                  rows: int | None = None, eval_batches: int = 4, step: int | None = None, seed: int = 0,
                  log: Callable[[str], None] = print) -> dict:
    """Train a task head of `kind` over `tasks` (names, comma-separated, or "all") on the frozen
    run `ckpt` and write the model with its head as run `out`, with a report: every task's
    validation loss of the model alone and with its output, the head's parameters, the share
    of its expert units that are zero and its tasks' mean gate weights. rows: windows per task
    per step (default: the run's batch size over the number of tasks, at least 1).
    Everything is checked before the run's weights are read."""
    from jmoe import evals
    from jmoe.data import eval_batches as make_eval_batches
    from jmoe.editing.run import editable_run
    from jmoe.merge.staging import staged_dir
    from jmoe.train import rundir

    if kind not in KINDS:
        raise ValueError(f"--head {kind!r} is unknown; known: {', '.join(KINDS)}")
    for name, v, lo in (("--steps", steps, 1), ("--experts", experts, 1), ("--eval-batches", eval_batches, 1),
                        ("--hidden", 1 if hidden is None else hidden, 1), ("--rows", 1 if rows is None else rows, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} {v!r} must be an integer >= {lo}")
    if not lr > 0:
        raise ValueError(f"--lr {lr!r} must be > 0")
    task_list = evals.resolve_tasks(tasks)
    out, cfg = editable_run(ckpt, out, "train a task head on")
    if cfg.task_head is not None:
        raise ValueError(f"{ckpt} has a task head already; train on its source run")
    th = head_config(task_list, kind, cfg.d_model, hidden=hidden, experts=experts)
    hcfg = cfg.replace(task_head=th)
    t0 = time.perf_counter()
    _, tc, params, router_state, saved, at = rundir.load_run(ckpt, step)
    rows = rows or max(1, tc.batch_size // len(task_list))
    log(f"reading {len(task_list)} tasks' text")
    corpora = task_corpora(task_list, log)
    val = [make_eval_batches(c.val, eval_batches, rows, tc.seq_len) for c in corpora]
    head = init_task_head(jax.random.key(seed), th)
    log(f"training a {kind} head ({head_params(th):,} parameters) over {len(task_list)} tasks on {ckpt}: "
        f"{steps} steps of {rows} window(s) per task")
    head, history = train_task_head(hcfg, params, router_state or None, head,
                                    lambda i: task_batch(corpora, seed + 7919, i, rows, tc.seq_len), steps=steps, lr=lr,
                                    log=log)
    scores = evaluate_task_head(hcfg, params, router_state or None, head, val)
    report = {"source": str(Path(ckpt).absolute()), "step": at, "kind": kind, "tasks": list(th.tasks),
              "head_params": head_params(th), "steps": steps, "lr": lr, "rows": rows, "seed": seed,
              "history": history, "scores": scores}
    with staged_dir(out) as tmp:
        rundir.save_model_run(tmp, hcfg, tc, {**jax.tree.map(np.asarray, params),
                                              "task_head": jax.tree.map(np.asarray, head)},
                              router_state, at, saved.get("data", {}), meta={"task_head_from": report["source"]})
        report["wall_s"] = time.perf_counter() - t0
        rundir.write_report(tmp, report)
    for name, v in scores["tasks"].items():
        log(f"  {name:<12} validation loss {v['model_loss']:.4f} -> {v['head_loss']:.4f}")
    log(f"mean over tasks: {scores['model_loss']:.4f} -> {scores['head_loss']:.4f} with the {kind} head; "
        f"{scores['zero_share']:.1%} of its expert units are zero; wrote {out}")
    return report
