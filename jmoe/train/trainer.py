"""The training loop: optax AdamW with warmup + cosine, orbax checkpoints, exact resume.

A run directory holds:
  config.json      model, training and data description (the data's content hash included)
  metrics.jsonl    per-step training records and validation records
  training.png     loss curves and per-layer expert load over time
  summary.json     final numbers (written at the end)
  checkpoints/     orbax step directories: params, optimizer state, step, PRNG key, data position

Batches are a function of (seed, step) and routing noise of (key, step), so a resumed run
repeats exactly the trajectory of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jmoe
from jmoe.data import Corpus, eval_batches, load_corpus, train_batch
from jmoe.nn.transformer import LMConfig, init_lm, init_lm_state, lm_apply, stack_padded, update_lm_state
from jmoe.parallel import ExpertParallel, batch_sharding, global_array, is_primary, make_mesh, shardings, to_host
from jmoe.train.checkpoint import CheckpointError, CheckpointStore
from jmoe.train.config import TrainConfig
from jmoe.train.metrics import MetricsLog, atomic_write_text
from jmoe.train.plot import plot_run
from jmoe.progress import Progress

# Fields of TrainConfig a resumed run may change: they do not alter the trajectory so far.
RESUMABLE_CHANGES = {"steps", "eval_every", "eval_batches", "ckpt_every", "keep_ckpts", "log_every", "mesh"}


class TrainError(ValueError):
    """A run cannot start or resume (bad configuration, mismatched or corrupt checkpoint)."""


class NonFiniteLoss(RuntimeError):
    """The loss or the parameters became NaN/inf; the last good checkpoint is kept."""


class Placement:
    """Where a run's arrays live: one device, or a mesh (sharded by jmoe.parallel's rules)."""

    def __init__(self, mesh_spec: str | None, tc: TrainConfig | None = None):
        self.mesh = make_mesh(mesh_spec) if mesh_spec else None
        self.ep = (
            ExpertParallel(self.mesh, tc.ep_impl, tc.ep_capacity_factor) if self.mesh is not None and tc else None
        )

    def shardings(self, abstract):
        if self.mesh is None:
            one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            return jax.tree.map(lambda _: one, abstract)
        return shardings(abstract, self.mesh)

    def abstract(self, abstract):
        """ShapeDtypeStructs carrying this placement's shardings (for restoring checkpoints)."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.shardings(abstract)
        )

    def batch(self, host: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(host)
        return global_array(host, batch_sharding(self.mesh))

    def batch_sharding(self):
        return batch_sharding(self.mesh)

    def check_batch(self, batch_size: int) -> None:
        if self.mesh is None:
            return
        from jmoe.parallel.mesh import num_token_shards

        n = num_token_shards(self.mesh)
        if batch_size % n:
            raise TrainError(f"batch_size={batch_size} is not divisible by the mesh's {n} token shards")


def make_optimizer(tc: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decay on matrices only) with global-norm clipping; warmup + cosine learning rate."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.lr,
        warmup_steps=max(tc.warmup_steps, 1),
        decay_steps=max(tc.steps, tc.warmup_steps + 1),
        end_value=tc.lr * tc.min_lr_ratio,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask),
    ), schedule


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats). logits: [B, S, V]; targets: [B, S] int."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def _moe_metrics(auxes) -> dict:
    """Per-MoE-layer statistics ([L, ...] arrays) from one step's MoEAux list."""
    if not auxes:
        return {}
    stack = lambda f: jnp.stack([f(a) for a in auxes])
    return {
        "load": stack_padded([a.load for a in auxes]),
        "max_vio": stack(lambda a: a.max_violation),
        "dropped": stack(lambda a: a.dropped_fraction),
        "entropy": stack(lambda a: a.router_entropy),
        "experts_per_token": stack(lambda a: a.experts_per_token),
        "zero_compute": stack(lambda a: a.zero_compute_fraction),
        "balance": stack(lambda a: a.balance_loss),
    }


def init_train_state(model_cfg: LMConfig, tc: TrainConfig, tx) -> dict:
    """A fresh train state from `tc.seed`: "step" and "data_position" (int32 zeros), "params",
    "opt_state" (`tx.init`), "rng" (key data), and "router_state" when the routers keep state."""
    key = jax.random.key(tc.seed)
    k_init, k_run = jax.random.split(key)
    params = init_lm(k_init, model_cfg)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "data_position": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(k_run),
    }
    router_state = init_lm_state(model_cfg)
    if router_state:
        state["router_state"] = router_state
    return state


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """T^2 * mean over positions of KL(softmax(teacher / T) || softmax(student / T)); logits [B, S, V]."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return temperature**2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))


def make_train_step(model_cfg: LMConfig, tx, schedule, placement: Placement | None = None, state_shardings=None,
                    grad_accum: int = 1, teacher_cfg: LMConfig | None = None, distill_weight: float = 0.5,
                    distill_temperature: float = 1.0) -> Callable:
    """Jitted `(state, batch [B, S+1][, teacher]) -> (state, metrics)`; the state buffers are donated.

    With grad_accum > 1 the batch is split into that many micro-batches whose gradients are
    averaged; a global-scope balance loss then sees the counts of the whole batch (a
    forward-only pass collects them first), so the step equals the unsplit one.
    With teacher_cfg the step takes a third argument {"params", "router_state"} of the teacher
    and trains on (1 - w) CE + w `distillation_loss`.
    """
    ep = placement.ep if placement is not None else None
    moe = model_cfg.moe

    def loss_fn(params, tokens, key, router_state, counts, teacher):
        logits, aux = lm_apply(params, tokens[:, :-1], model_cfg, state=router_state, key=key, ep=ep,
                               balance_counts=counts)
        ce = cross_entropy(logits, tokens[:, 1:])
        if teacher is None:
            return ce + aux.moe_loss, (ce, aux)
        t_logits, _ = lm_apply(teacher["params"], tokens[:, :-1], teacher_cfg, state=teacher.get("router_state"))
        kd = distillation_loss(logits, jax.lax.stop_gradient(t_logits), distill_temperature)
        return (1 - distill_weight) * ce + distill_weight * kd + aux.moe_loss, (ce, aux)

    def step(state, tokens, teacher=None):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        router_state = state.get("router_state")
        params = state["params"]
        if grad_accum == 1:
            (_, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, key, router_state, None, teacher)
            counts = aux.counts(model_cfg)
            moe_stats = _moe_metrics(aux.moe)
            aux_loss = aux.moe_loss
        else:
            micro = tokens.reshape((grad_accum, tokens.shape[0] // grad_accum) + tokens.shape[1:])
            keys = jax.random.split(key, grad_accum)
            step_counts = None
            if moe is not None and moe.balance_scope == "global":
                per_micro = jax.lax.map(
                    lambda mb: lm_apply(params, mb[:, :-1], model_cfg, state=router_state, ep=ep)[1].counts(model_cfg),
                    micro,
                )
                step_counts = jax.lax.stop_gradient(jax.tree.map(lambda c: jnp.sum(c, axis=0), per_micro))

            def body(acc, inputs):
                mb, k = inputs
                (_, (ce, aux)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, k, router_state, step_counts, teacher)
                out = (ce, aux.moe_loss, aux.counts(model_cfg), _moe_metrics(aux.moe))
                return jax.tree.map(jnp.add, acc, g), out

            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, (ces, aux_losses, counts_all, stats_all) = jax.lax.scan(body, zeros, (micro, keys))
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            ce, aux_loss = jnp.mean(ces), jnp.mean(aux_losses)
            counts = jax.tree.map(lambda c: jnp.sum(c, axis=0), counts_all)
            moe_stats = jax.tree.map(lambda v: jnp.mean(v, axis=0), stats_all)
            if moe_stats:  # the step's load: from the summed counts, not the mean of shares
                load = stack_padded([counts[str(i)] for i in model_cfg.moe_layers])
                moe_stats["load"] = load / jnp.maximum(jnp.sum(load, axis=-1, keepdims=True), 1.0)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
        new_state = dict(
            state,
            step=state["step"] + 1,
            data_position=state["data_position"] + 1,
            params=params,
            opt_state=opt_state,
        )
        if router_state:
            new_state["router_state"] = update_lm_state(router_state, counts, model_cfg)
        metrics = {
            "loss": ce,
            "aux_loss": aux_loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]),
            "params_finite": finite,
            **moe_stats,
        }
        return new_state, metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    out_metrics = jax.sharding.NamedSharding(placement.mesh, jax.sharding.PartitionSpec()) if placement.mesh else None
    return jax.jit(
        step,
        in_shardings=(state_shardings, placement.batch_sharding() if placement.mesh else None),
        out_shardings=(state_shardings, out_metrics),
        donate_argnums=0,
    )


def make_eval_step(model_cfg: LMConfig, placement: Placement | None = None) -> Callable:
    """Jitted `(params, router_state, batch) -> (mean CE, [L_moe, E] load)`."""
    ep = placement.ep if placement is not None else None

    @jax.jit
    def step(params, router_state, tokens):
        logits, aux = lm_apply(params, tokens[:, :-1], model_cfg, state=router_state, ep=ep)
        load = aux.load() if aux.moe else jnp.zeros((0, 0))
        return cross_entropy(logits, tokens[:, 1:]), load

    return step


def evaluate(
    params, router_state, model_cfg: LMConfig, batches: np.ndarray, eval_step=None, placement: Placement | None = None
) -> dict:
    """Validation over fixed batches [N, B, S+1]: loss (nats/byte), bits per byte, per-layer load."""
    eval_step = eval_step or make_eval_step(model_cfg, placement)
    put = placement.batch if placement is not None else jnp.asarray
    ces, loads = [], []
    for b in batches:
        ce, load = to_host(eval_step(params, router_state, put(b)))
        ces.append(float(ce))
        loads.append(np.asarray(load))
    val = float(np.mean(ces))
    load = [row[: model_cfg.moe_for(i).num_choices].tolist() for i, row in zip(model_cfg.moe_layers, np.mean(loads, axis=0))]
    return {"val_loss": val, "val_bpb": val / math.log(2), "load": load}


def abstract_train_state(model_cfg: LMConfig, tc: TrainConfig):
    """The train state's shapes and dtypes (`jax.eval_shape`), without allocating it."""
    tx, _ = make_optimizer(tc)
    return jax.eval_shape(lambda: init_train_state(model_cfg, tc, tx))


def _run_config(model_cfg, tc, corpus) -> dict:
    return {
        "model": model_cfg.to_dict(),
        "train": tc.to_dict(),
        "data": corpus.metadata(),
        "jmoe_version": jmoe.__version__,
    }


def _check_resume_compatible(saved: dict, model_cfg: LMConfig, tc: TrainConfig, corpus: Corpus) -> None:
    saved_model = LMConfig.from_dict(saved["model"])
    if saved_model != model_cfg:
        diffs = _dict_diff(saved_model.to_dict(), model_cfg.to_dict())
        raise TrainError(f"cannot resume: the model differs from the run's ({diffs})")
    saved_train = saved["train"]
    changed = {k for k, v in tc.to_dict().items() if saved_train.get(k) != v} - RESUMABLE_CHANGES
    if changed:
        diffs = ", ".join(f"{k}: {saved_train.get(k)!r} -> {getattr(tc, k)!r}" for k in sorted(changed))
        raise TrainError(f"cannot resume: training settings differ from the run's ({diffs})")
    if saved.get("data", {}).get("sha256") != corpus.sha256:
        raise TrainError(
            f"cannot resume: the corpus differs from the run's (sha256 {saved['data'].get('sha256', '?')[:12]} "
            f"vs {corpus.sha256[:12]})"
        )


def _dict_diff(a: dict, b: dict, prefix="") -> str:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            sub = _dict_diff(va, vb, f"{prefix}{k}.")
            if sub:
                out.append(sub)
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return ", ".join(out)


def _host_metrics(step: int, m: dict, tokens_per_s: float | None) -> dict:
    rec = {
        "kind": "train",
        "step": step,
        "loss": float(m["loss"]),
        "aux_loss": float(m["aux_loss"]),
        "grad_norm": float(m["grad_norm"]),
        "lr": float(m["lr"]),
    }
    if tokens_per_s is not None:
        rec["tokens_per_s"] = tokens_per_s
    if "load" in m:
        rec["load"] = np.round(np.asarray(m["load"]), 5).tolist()
        rec["max_vio"] = np.round(np.asarray(m["max_vio"]), 5).tolist()
        rec["dropped"] = np.round(np.asarray(m["dropped"]), 5).tolist()
        rec["router_entropy"] = np.round(np.asarray(m["entropy"]), 5).tolist()
        rec["experts_per_token"] = np.round(np.asarray(m["experts_per_token"]), 5).tolist()
        rec["zero_compute"] = np.round(np.asarray(m["zero_compute"]), 5).tolist()
        rec["balance"] = np.round(np.asarray(m["balance"]), 5).tolist()
    return rec


def train(
    model_cfg: LMConfig,
    tc: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    corpus: Corpus | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train `model_cfg` with `tc`, writing the run directory `out_dir` (see module docstring).

    stop_after: leave after this many steps in this process, with a checkpoint (for time-limited
    sessions; continue with resume=True).

    Returns the summary dict. Raises TrainError for runs that cannot start or resume (nothing
    on disk is changed then) and NonFiniteLoss when the loss diverges (the last good
    checkpoint is kept).
    """
    out = Path(out_dir)
    if tc.seq_len > model_cfg.max_seq_len:
        raise TrainError(f"seq_len={tc.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} exists and is not a directory")
    corpus = corpus if corpus is not None else load_corpus(tc.data)
    if corpus.train.size < tc.seq_len + 2 or corpus.val.size < tc.seq_len + 2:
        raise TrainError(
            f"the corpus {corpus.source} is too small for seq_len={tc.seq_len} "
            f"({corpus.train.size} train / {corpus.val.size} validation bytes)"
        )
    try:
        placement = Placement(tc.mesh, tc)
    except ValueError as e:
        raise TrainError(str(e)) from None
    placement.check_batch(tc.batch_size // tc.grad_accum)
    primary = is_primary()
    if not primary:
        log = lambda _msg: None
        progress = False
    out.mkdir(parents=True, exist_ok=True)
    store = CheckpointStore(out / "checkpoints", keep=tc.keep_ckpts)
    latest = store.latest_step()
    config_path = out / "config.json"
    if latest is not None and not resume:
        raise TrainError(
            f"{out} already holds a run (checkpoint at step {latest}); pass --resume to continue it "
            "or choose another --out"
        )

    teacher = teacher_cfg = None
    if tc.distill_from:
        if placement.mesh is not None:
            raise TrainError("distillation runs on one device (--distill-from cannot be combined with --mesh)")
        teacher_cfg, _, t_params, t_state, _, _ = load_run(tc.distill_from)
        teacher = {"params": t_params, **({"router_state": t_state} if t_state else {})}
        if teacher_cfg.vocab_size != model_cfg.vocab_size:
            raise TrainError(f"cannot distill: the teacher's vocabulary ({teacher_cfg.vocab_size}) differs from "
                             f"the model's ({model_cfg.vocab_size})")
    tx, schedule = make_optimizer(tc)
    metrics_log = MetricsLog(out / "metrics.jsonl")
    abstract = jax.eval_shape(lambda: init_train_state(model_cfg, tc, tx))
    state_shardings = placement.shardings(abstract)
    if resume and latest is not None:
        if not config_path.exists():
            raise TrainError(f"cannot resume: {config_path} is missing")
        _check_resume_compatible(json.loads(config_path.read_text()), model_cfg, tc, corpus)
        try:
            state, meta = store.restore(latest, placement.abstract(abstract))
        except CheckpointError as e:
            raise TrainError(str(e)) from None
        start = int(to_host(state["step"]))
        if primary:
            metrics_log.truncate_after(start)
        log(f"resuming {out} from step {start}")
    else:
        state = jax.jit(lambda: init_train_state(model_cfg, tc, tx), out_shardings=state_shardings)()
        if tc.init_from:
            state = _start_from_run(state, tc.init_from, model_cfg, tx, state_shardings)
            log(f"starting from the parameters of {tc.init_from} (fresh optimizer)")
        start = 0
        if primary:
            metrics_log.truncate_after(0)
    if primary:
        atomic_write_text(config_path, json.dumps(_run_config(model_cfg, tc, corpus), indent=1))

    train_step = make_train_step(
        model_cfg, tx, schedule, placement, state_shardings if placement.mesh is not None else None, tc.grad_accum,
        teacher_cfg=teacher_cfg, distill_weight=tc.distill_weight, distill_temperature=tc.distill_temperature,
    )
    eval_step = make_eval_step(model_cfg, placement)
    val = eval_batches(corpus.val, tc.eval_batches, tc.batch_size, tc.seq_len)
    tokens_per_step = tc.batch_size * tc.seq_len
    bar = Progress(tc.steps, start=start, enabled=progress)
    title = f"{'MoE' if model_cfg.moe else 'dense'} LM, {model_cfg.num_params(active=True) / 1e6:.2f}M active params"
    if start == 0:
        log(
            f"training {title} ({model_cfg.num_params() / 1e6:.2f}M total) on {corpus.source} "
            f"({corpus.train.size / 1e6:.1f} MB) for {tc.steps} steps of {tokens_per_step} tokens"
        )

    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    last_eval = None
    step_times: list[float] = []
    t_run = time.perf_counter()
    last_good_ckpt = latest
    try:
        for step in range(start, end):
            batch = placement.batch(train_batch(corpus.train, tc.seed, step, tc.batch_size, tc.seq_len))
            t0 = time.perf_counter()
            state, m = train_step(state, batch) if teacher is None else train_step(state, batch, teacher)
            m = to_host(m)
            dt = time.perf_counter() - t0
            done = step + 1
            if step > start:  # the first step of a process includes compilation
                step_times.append(dt)
            tps = tokens_per_step / np.mean(step_times[-20:]) if step_times else None
            if not (np.isfinite(m["loss"]) and bool(m["params_finite"])):
                bar.close()
                where = f"step {last_good_ckpt} in {store.directory}" if last_good_ckpt is not None else "none was saved"
                raise NonFiniteLoss(
                    f"the loss became {float(m['loss'])} at step {done}; stopping. Last good checkpoint: {where}"
                )
            if primary and (done % tc.log_every == 0 or done == tc.steps):
                metrics_log.append(_host_metrics(done, m, tps))
            fields = {"loss": f"{float(m['loss']):.3f}"}
            if "max_vio" in m:
                fields["imb"] = f"{float(np.mean(m['max_vio'])):.2f}"
            if last_eval is not None:
                fields["val"] = f"{last_eval:.3f}"
            if tps:
                fields["tok/s"] = f"{tps:,.0f}"
            bar.update(done, fields)
            if done % tc.eval_every == 0 or done == tc.steps:
                ev = evaluate(state["params"], state.get("router_state"), model_cfg, val, eval_step, placement)
                last_eval = ev["val_loss"]
                if primary:
                    metrics_log.append({"kind": "eval", "step": done, **ev})
                    plot_run(metrics_log.records(), out / "training.png", title)
            if done % tc.ckpt_every == 0 or done == end:
                store.save(done, state, {"step": done, "data_position": done, "loss": float(m["loss"])})
                last_good_ckpt = done
    finally:
        bar.close()
        store.close()

    if end < tc.steps:
        log(f"stopped at step {end} of {tc.steps} with a checkpoint; continue with --resume")
        return {"steps": end, "stopped_early": True}
    if not primary:
        return {"steps": tc.steps}
    records = metrics_log.records()
    train_recs = [r for r in records if r["kind"] == "train"]
    eval_recs = [r for r in records if r["kind"] == "eval"]
    summary = {
        "steps": tc.steps,
        "train_loss": train_recs[-1]["loss"] if train_recs else None,
        "val_loss": eval_recs[-1]["val_loss"] if eval_recs else None,
        "val_bpb": eval_recs[-1]["val_bpb"] if eval_recs else None,
        "tokens_per_s": float(tokens_per_step / np.median(step_times)) if step_times else None,
        "wall_s_this_process": time.perf_counter() - t_run,
        "active_params": model_cfg.num_params(active=True),
        "total_params": model_cfg.num_params(),
        "mesh": tc.mesh,
        "devices": jax.device_count(),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    log(
        f"done: step {tc.steps}, train loss {summary['train_loss']:.4f}, validation loss "
        f"{summary['val_loss']:.4f} ({summary['val_bpb']:.3f} bits/byte)"
        + (f", {summary['tokens_per_s']:,.0f} tokens/s" if summary["tokens_per_s"] else "")
    )
    return summary


def _start_from_run(state: dict, run_dir: str, model_cfg: LMConfig, tx, shardings) -> dict:
    """`state` with the parameters and router state of another run and a fresh optimizer."""
    src_cfg, _, params, router_state, _, _ = load_run(run_dir)
    if src_cfg != model_cfg:
        diffs = _dict_diff(src_cfg.to_dict(), model_cfg.to_dict())
        raise TrainError(f"cannot start from {run_dir}: its model differs ({diffs})")
    new = dict(state, params=params, opt_state=tx.init(params))
    if router_state:
        new["router_state"] = router_state
    return jax.device_put(new, shardings) if shardings is not None else new


def load_run(run_dir: str | Path, step: int | None = None):
    """Restore a run's model for evaluation or sampling.

    Returns (model_cfg, train_cfg, params, router_state, run_config dict, step).
    """
    run = Path(run_dir)
    config_path = run / "config.json"
    if not config_path.exists():
        raise TrainError(f"{run} is not a jmoe run directory (no config.json)")
    try:
        saved = json.loads(config_path.read_text())
        model_cfg = LMConfig.from_dict(saved["model"])
        tc = TrainConfig.from_dict(saved["train"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise TrainError(f"{config_path} is corrupt: {e}") from None
    if not (run / "checkpoints").is_dir():
        raise TrainError(f"{run} has no checkpoints")
    store = CheckpointStore(run / "checkpoints", create=False)
    try:
        steps = store.steps()
        if not steps:
            raise TrainError(f"{run} has no complete checkpoint")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise TrainError(f"{run} has no checkpoint at step {step} (have {steps})")
        try:
            state, _ = store.restore(step, Placement(None).abstract(abstract_train_state(model_cfg, tc)))
        except CheckpointError as e:
            raise TrainError(str(e)) from None
    finally:
        store.close()
    return model_cfg, tc, state["params"], state.get("router_state"), saved, step
