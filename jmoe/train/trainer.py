"""The training loop: optax AdamW with warmup + cosine, orbax checkpoints, exact resume.

`train` writes a run directory (its format: `jmoe.train.rundir`) in named steps: check the
inputs, lock the run directory and check what it holds, start or restore the state, run
the steps (with the logging, evaluation and checkpoint hooks), and write the summary.
Nothing is written before every check that bad input can fail has passed.

Batches are a function of (seed, step) and routing noise of (key, step), so a resumed run
repeats exactly the trajectory of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmoe.data import Corpus, eval_batches, load_corpus, train_batch
from jmoe.losses import needs_step_counts
from jmoe.nn.transformer import LMConfig, init_lm, lm_apply, stack_padded, token_nll, update_lm_state
from jmoe.parallel import ExpertParallel, batch_sharding, global_array, is_primary, make_mesh, shardings, to_host
from jmoe.parallel.fssdp import FSSDP_RULES
from jmoe.parallel.rules import DEFAULT_RULES
from jmoe.progress import Progress
from jmoe.train import rundir
from jmoe.train.checkpoint import CheckpointStore
from jmoe.train.config import TrainConfig
from jmoe.train import finetune, rebalance
from jmoe.train.errors import NonFiniteLoss, TrainError
from jmoe.train.metrics import MetricsLog
from jmoe.train.plot import plot_run
from jmoe.train.rundir import load_run
from jmoe.train.state import abstract_train_state, global_norm, init_train_state, make_optimizer

__all__ = [
    "NonFiniteLoss",
    "Placement",
    "TrainError",
    "abstract_train_state",
    "cross_entropy",
    "distillation_loss",
    "evaluate",
    "init_train_state",
    "load_run",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "train",
]


class Placement:
    """Where a run's arrays live: one device, or a mesh (sharded by jmoe.parallel's rules)."""

    def __init__(self, mesh_spec: str | None, tc: TrainConfig | None = None):
        self.mesh = make_mesh(mesh_spec) if mesh_spec else None
        # a run with an expert placement holds its experts in their slots (`jmoe.train.rebalance`)
        self.ep = (
            ExpertParallel(self.mesh, tc.ep_impl, fssdp_experts=tc.fssdp_experts,
                           experts_in_slots=rebalance.uses_placement(tc))
            if self.mesh is not None and tc else None
        )
        # FSSDP keeps whole experts, and their optimizer state, sharded over every device
        self.rules = FSSDP_RULES if tc is not None and tc.ep_impl == "fssdp" else DEFAULT_RULES

    def shardings(self, abstract):
        if self.mesh is None:
            one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            return jax.tree.map(lambda _: one, abstract)
        return shardings(abstract, self.mesh, self.rules)

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


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats). logits: [B, S, V]; targets: [B, S] int."""
    return jnp.mean(token_nll(logits, targets))


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


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """T^2 * mean over positions of KL(softmax(teacher / T) || softmax(student / T)); logits [B, S, V]."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return temperature**2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))


def symmetric_kl(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """Mean over positions of (KL(p || q) + KL(q || p)) / 2 = sum_v (p - q)(log p - log q) / 2,
    p and q the softmax of logits [B, S, V] (THOR's consistency loss)."""
    lp = jax.nn.log_softmax(logits_p.astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(logits_q.astype(jnp.float32), axis=-1)
    return 0.5 * jnp.mean(jnp.sum((jnp.exp(lp) - jnp.exp(lq)) * (lp - lq), axis=-1))


def make_train_step(model_cfg: LMConfig, tx, schedule, placement: Placement | None = None, state_shardings=None,
                    grad_accum: int = 1, teacher_cfg: LMConfig | None = None, distill_weight: float = 0.5,
                    distill_temperature: float = 1.0, consistency_weight: float = 0.0) -> Callable:
    """Jitted `(state, batch [B, S+1][, teacher]) -> (state, metrics)`; the state buffers are donated.

    With grad_accum > 1 the batch is split into that many micro-batches whose gradients are
    averaged; a global-scope balance loss then sees the counts of the whole batch (a
    forward-only pass collects them first), so the step equals the unsplit one. That pass is
    the price of one micro-batch's activation memory: a micro-batch's backward pass needs the
    counts of the later ones, so without it every micro-batch's activations would have to wait
    for the last forward, the memory of the unsplit step (experiments/bench_grad_accum.py).
    With teacher_cfg the step takes a third argument {"params", "router_state"} of the teacher
    and trains on (1 - w) CE + w `distillation_loss`. Fine-tuning adapters (state["params"]
    holds `params["adapters"]` alone), the step takes the frozen model {"params",
    "router_state"} as its fourth argument `base`: gradients, optimizer and router-state
    updates touch the adapters only. With consistency_weight > 0 every (micro-)batch runs twice
    with independent keys and trains on CE_1 + CE_2 + weight * `symmetric_kl` (THOR); the
    metrics and router statistics are the first pass's.
    """
    ep = placement.ep if placement is not None else None
    moe = model_cfg.moe
    in_slots = ep is not None and ep.experts_in_slots

    def model(params, router_state, base):
        """The parameters and router state the forward runs with."""
        return (params, router_state) if base is None else finetune.join(base, params, router_state)

    def loss_fn(params, tokens, key, router_state, counts, teacher, base):
        params, router_state = model(params, router_state, base)
        logits, aux = lm_apply(params, tokens[:, :-1], model_cfg, state=router_state, key=key, ep=ep,
                               balance_counts=counts)
        ce = cross_entropy(logits, tokens[:, 1:])
        if consistency_weight:  # a second pass with other random choices (THOR)
            logits2, aux2 = lm_apply(params, tokens[:, :-1], model_cfg, state=router_state,
                                     key=jax.random.fold_in(key, 0x7402), ep=ep, balance_counts=counts)
            loss = ce + cross_entropy(logits2, tokens[:, 1:]) + consistency_weight * symmetric_kl(logits, logits2)
            return loss + aux.moe_loss + aux2.moe_loss, (ce, aux)
        if teacher is None:
            return ce + aux.moe_loss, (ce, aux)
        t_logits, _ = lm_apply(teacher["params"], tokens[:, :-1], teacher_cfg, state=teacher.get("router_state"))
        kd = distillation_loss(logits, jax.lax.stop_gradient(t_logits), distill_temperature)
        return (1 - distill_weight) * ce + distill_weight * kd + aux.moe_loss, (ce, aux)

    def step(state, tokens, teacher=None, base=None):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        router_state = state.get("router_state")
        params = state["params"]
        if grad_accum == 1:
            (_, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, key, router_state, None, teacher,
                                                                                base)
            counts = aux.counts(model_cfg)
            moe_stats = _moe_metrics(aux.moe)
            aux_loss = aux.moe_loss
        else:
            micro = tokens.reshape((grad_accum, tokens.shape[0] // grad_accum) + tokens.shape[1:])
            keys = jax.random.split(key, grad_accum)
            step_counts = None
            if moe is not None and any(needs_step_counts(model_cfg.moe_for(i)) for i in model_cfg.moe_layers):
                def counts_of(mb):
                    p, s = model(params, router_state, base)
                    return lm_apply(p, mb[:, :-1], model_cfg, state=s, ep=ep)[1].counts(model_cfg)

                per_micro = jax.lax.map(counts_of, micro)
                step_counts = jax.lax.stop_gradient(jax.tree.map(lambda c: jnp.sum(c, axis=0), per_micro))

            def body(acc, inputs):
                mb, k = inputs
                (_, (ce, aux)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, k, router_state, step_counts, teacher,
                                                                                base)
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
        # experts held in their slots: the copies of an expert count once in the gradient's norm
        norm_weights = rebalance.copy_weights(params, router_state) if in_slots else None
        extra = {"norm_weights": norm_weights} if in_slots else {}
        updates, opt_state = tx.update(grads, state["opt_state"], params, **extra)
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
            "grad_norm": global_norm(grads, norm_weights),
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
    """Jitted `(params, router_state, batch) -> (mean CE, [L_moe, E] load, [L_moe] share of
    FFN slots skipped)`."""
    ep = placement.ep if placement is not None else None

    @jax.jit
    def step(params, router_state, tokens):
        logits, aux = lm_apply(params, tokens[:, :-1], model_cfg, state=router_state, ep=ep)
        load = aux.load() if aux.moe else jnp.zeros((0, 0))
        skipped = jnp.stack([a.skipped_fraction for a in aux.moe]) if aux.moe else jnp.zeros((0,))
        return cross_entropy(logits, tokens[:, 1:]), load, skipped

    return step


def evaluate(
    params, router_state, model_cfg: LMConfig, batches: np.ndarray, eval_step=None, placement: Placement | None = None
) -> dict:
    """Validation over fixed batches [N, B, S+1]: loss (nats/byte), bits per byte, per-layer
    load, and with online expert skipping (`skip_ratio`) the share of expert slots skipped per
    layer (`skipped`) and over all layers (`skip_rate`)."""
    eval_step = eval_step or make_eval_step(model_cfg, placement)
    put = placement.batch if placement is not None else jnp.asarray
    ces, loads, skips = [], [], []
    for b in batches:
        ce, load, skipped = to_host(eval_step(params, router_state, put(b)))
        ces.append(float(ce))
        loads.append(np.asarray(load))
        skips.append(np.asarray(skipped))
    val = float(np.mean(ces))
    load = [row[: model_cfg.moe_for(i).num_choices].tolist() for i, row in zip(model_cfg.moe_layers, np.mean(loads, axis=0))]
    out = {"val_loss": val, "val_bpb": val / math.log(2), "load": load}
    if any(model_cfg.moe_for(i).skip_ratio for i in model_cfg.moe_layers):
        skipped = np.mean(skips, axis=0)
        out["skipped"] = skipped.tolist()
        out["skip_rate"] = float(skipped.mean())
    return out


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


# ------------------------------------------------------------------------- the steps of train


@dataclasses.dataclass
class _Run:
    """What the steps of `train` share: the run directory and how the run is laid out."""

    out: Path
    model_cfg: LMConfig
    tc: TrainConfig
    corpus: Corpus
    placement: Placement
    store: CheckpointStore
    metrics: MetricsLog
    primary: bool
    latest: int | None  # the newest checkpoint when the run started (None: none)
    base: dict | None = None  # the frozen model of a fine-tuning run: {"params", "router_state"}
    per_expert: Callable = lambda state: state  # the state as checkpoints hold it (`rebalance.to_experts`)
    move: Callable = None  # (state, sources) -> the state re-placed (`rebalance.moved`)

    @property
    def title(self) -> str:
        cfg = self.model_cfg
        return f"{'MoE' if cfg.moe else 'dense'} LM, {cfg.num_params(active=True) / 1e6:.2f}M active params"


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
    """Train `model_cfg` with `tc`, writing the run directory `out_dir` (`jmoe.train.rundir`).

    stop_after: leave after this many steps in this process, with a checkpoint (for time-limited
    sessions; continue with resume=True). Resuming a finished run changes nothing and returns
    its summary.

    The run directory has one writer: this process holds its lock (`rundir.lock`) from before
    it writes anything until it returns. Returns the summary dict. Raises TrainError for runs
    that cannot start or resume (nothing on disk is changed then; RunLocked when another
    process writes `out_dir`) and NonFiniteLoss when the loss diverges (the last good
    checkpoint is kept).
    """
    out = Path(out_dir)
    corpus = _check_inputs(model_cfg, tc, out, corpus)
    placement = _placement(tc)
    primary = is_primary()
    if not primary:
        log = lambda _msg: None
        progress = False
    lock = rundir.lock(out) if primary else None
    writing = False
    try:
        latest = _check_run_dir(out, model_cfg, tc, corpus, resume)
        if latest is not None and latest >= tc.steps and rundir.read_summary(out) is not None:
            log(f"{out} already finished at step {latest}; nothing to do (raise --steps to train it further)")
            return rundir.read_summary(out)
        teacher_cfg, teacher = _load_teacher(tc)
        base = _load_base(tc)
        tx, schedule = make_optimizer(tc)
        abstract = abstract_train_state(model_cfg, tc)  # as checkpoints hold it
        state_shardings = placement.shardings(rebalance.held_layout(abstract, tc))  # as the run holds it
        state, start = _start_state(out, model_cfg, tc, placement, latest, tx, abstract, state_shardings, log)
        # everything that can fail on bad input has been checked: from here on the run is written
        writing = True
        if not primary:
            out.mkdir(parents=True, exist_ok=True)
        store = rundir.checkpoint_store(out, keep=tc.keep_ckpts)
        run = _Run(out, model_cfg, tc, corpus, placement, store, rundir.metrics_log(out), primary, latest, base)
        if rebalance.uses_placement(tc):  # the experts are held in their slots
            ckpt_shardings = placement.shardings(abstract)
            run.per_expert = jax.jit(lambda st: rebalance.to_experts(st, model_cfg), out_shardings=ckpt_shardings)
            run.move = jax.jit(rebalance.moved, out_shardings=state_shardings, donate_argnums=0)
        try:
            if primary:
                run.metrics.truncate_after(start)
                rundir.write_config(out, model_cfg, tc, corpus.metadata())
            train_step = make_train_step(
                model_cfg, tx, schedule, placement, state_shardings if placement.mesh is not None else None,
                tc.grad_accum, teacher_cfg=teacher_cfg, distill_weight=tc.distill_weight,
                distill_temperature=tc.distill_temperature, consistency_weight=tc.consistency_weight,
            )
            end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
            if start == 0:
                size = f"{corpus.train.size / 1e6:.1f} " + ("MB" if corpus.tokenizer is None else "M tokens")
                log(
                    f"training {run.title} ({model_cfg.num_params() / 1e6:.2f}M total) on {corpus.source} "
                    f"({size}) for {tc.steps} steps of {tc.batch_size * tc.seq_len} tokens"
                )
            t_run = time.perf_counter()
            step_times, state = _step_loop(run, state, start, end, train_step, teacher, progress)
        finally:
            store.close()
        if end < tc.steps:
            log(f"stopped at step {end} of {tc.steps} with a checkpoint; continue with --resume")
            return {"steps": end, "stopped_early": True}
        if not primary:
            return {"steps": tc.steps}
        if base is not None:
            finetune.save_adapters(out, state["params"], state.get("router_state"))
        return _write_summary(run, step_times, time.perf_counter() - t_run, log)
    finally:
        if lock is not None:
            lock.release(remove_created=not writing)


def _check_inputs(model_cfg: LMConfig, tc: TrainConfig, out: Path, corpus: Corpus | None) -> Corpus:
    """The corpus to train on (loaded from `tc.data` when not given), after checking that the
    run can start at all: nothing is written yet, and nothing expensive is done."""
    if tc.seq_len > model_cfg.max_seq_len:
        raise TrainError(f"seq_len={tc.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    if model_cfg.task_head is not None:
        raise TrainError("the model has a task head, which jmoe train does not train: train the model it was made "
                         "from, then jmoe task-head")
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} exists and is not a directory")
    for flag, source in (("--distill-from", tc.distill_from), ("--resume-from", tc.init_from)):
        if not source:
            continue
        try:
            saved, _ = rundir.find_checkpoint(source)
        except TrainError as e:
            raise TrainError(f"{flag}: {e}") from None
        src_cfg = LMConfig.from_dict(saved["model"])
        if flag == "--resume-from" and "quantization" in saved:
            raise TrainError(f"--resume-from: {source} has quantized experts, which cannot be trained; start from "
                             "its source run")
        if flag == "--resume-from" and src_cfg != model_cfg:
            raise TrainError(f"cannot start from {source}: its model differs ({rundir.config_diff(src_cfg, model_cfg)})")
        if flag == "--distill-from" and src_cfg.vocab_size != model_cfg.vocab_size:
            raise TrainError(f"cannot distill: the teacher's vocabulary ({src_cfg.vocab_size}) differs from "
                             f"the model's ({model_cfg.vocab_size})")
    if tc.distill_from and tc.consistency_weight:
        raise TrainError("--distill-from and consistency_weight cannot be combined (one regulariser per run)")
    if tc.distill_from and tc.mesh is not None:
        raise TrainError("distillation runs on one device (--distill-from cannot be combined with --mesh)")
    if tc.base_from:
        for name, value in (("--mesh", tc.mesh), ("--distill-from", tc.distill_from), ("--resume-from", tc.init_from)):
            if value:
                raise TrainError(f"fine-tuning adapters on a frozen model runs on one device, without {name}")
        finetune.check_base(model_cfg, tc.base_from)
    elif model_cfg.adapter is not None:
        raise TrainError("the model has adapters but no frozen model to train them on (TrainConfig.base_from)")
    if tc.train_only:
        _check_train_only(model_cfg, tc)
    if tc.base_from and rebalance.uses_placement(tc):
        raise TrainError("fine-tuning adapters runs on one device: it takes no expert placement")
    try:
        rebalance.check(model_cfg, tc)
    except ValueError as e:
        raise TrainError(str(e)) from None
    corpus = corpus if corpus is not None else load_corpus(tc.data)
    if (tc.base_from or tc.init_from) and corpus.tokenizer is None:
        corpus = finetune.corpus_for(corpus, tc.base_from or tc.init_from)
    unit = "bytes" if corpus.tokenizer is None else "tokens"
    if corpus.train.size < tc.seq_len + 2 or corpus.val.size < tc.seq_len + 2:
        raise TrainError(
            f"the corpus {corpus.source} is too small for seq_len={tc.seq_len} "
            f"({corpus.train.size} train / {corpus.val.size} validation {unit})"
        )
    ids = int(corpus.train.max(initial=0)) + 1
    if ids > model_cfg.vocab_size:
        raise TrainError(f"the training text has ids up to {ids - 1}, beyond the model's vocabulary of "
                         f"{model_cfg.vocab_size}")
    return corpus


def _check_train_only(model_cfg: LMConfig, tc: TrainConfig) -> None:
    """TrainError unless every name of `tc.train_only` is a key of the model's parameters."""
    if tc.mesh is not None or tc.base_from:
        raise TrainError("--train-only runs on one device and trains the model itself (not with --mesh or adapters)")
    shapes = jax.eval_shape(lambda: init_lm(jax.random.key(0), model_cfg))
    keys = {str(getattr(k, "key", k)) for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0] for k in path}
    keys = {k for k in keys if not k.isdigit()}
    unknown = [n for n in tc.train_only if n not in keys]
    if unknown:
        raise TrainError(f"--train-only {unknown[0]!r} names no parameter of the model; names: {', '.join(sorted(keys))}")


def _placement(tc: TrainConfig) -> Placement:
    """The run's `Placement`, checked to split a micro-batch over the mesh's token shards."""
    try:
        placement = Placement(tc.mesh, tc)
    except ValueError as e:
        raise TrainError(str(e)) from None
    placement.check_batch(tc.batch_size // tc.grad_accum)
    return placement


def _check_run_dir(out: Path, model_cfg: LMConfig, tc: TrainConfig, corpus: Corpus, resume: bool) -> int | None:
    """The newest complete checkpoint of the run in `out` (None: none), read without writing.
    Refuses to start a new run over an existing one, and to resume a different one."""
    latest = max(rundir.checkpoint_steps(out), default=None)
    if latest is None:
        return None
    if not resume:
        raise TrainError(
            f"{out} already holds a run (checkpoint at step {latest}); pass --resume to continue it "
            "or choose another --out"
        )
    config_path = out / rundir.CONFIG
    if not config_path.exists():
        raise TrainError(f"cannot resume: {config_path} is missing")
    rundir.check_resumable(rundir.read_run_config(out), model_cfg, tc, corpus.sha256)
    return latest


def _load_teacher(tc: TrainConfig) -> tuple[LMConfig | None, dict | None]:
    """(teacher config, {"params", "router_state"}) of `tc.distill_from` (checked by
    `_check_inputs`), or (None, None)."""
    if not tc.distill_from:
        return None, None
    try:
        teacher_cfg, _, t_params, t_state, _, _ = load_run(tc.distill_from)
    except TrainError as e:
        raise TrainError(f"--distill-from: {e}") from None
    return teacher_cfg, {"params": t_params, **({"router_state": t_state} if t_state else {})}


def _load_base(tc: TrainConfig) -> dict | None:
    """The frozen model {"params", "router_state"} of a fine-tuning run (checked by
    `_check_inputs`), or None."""
    if not tc.base_from:
        return None
    return finetune.load_base(tc.base_from)[1]


def _start_state(out: Path, model_cfg: LMConfig, tc: TrainConfig, placement: Placement, latest: int | None, tx,
                 abstract, state_shardings, log) -> tuple[dict, int]:
    """(state, first step): restored from checkpoint `latest` of the run in `out` when it has
    one (resuming), else fresh (or with the parameters of `tc.init_from`). abstract: the state's
    shapes as checkpoints hold them; state_shardings: as the run holds it. Writes nothing."""
    if latest is not None:
        state, _ = rundir.restore_state(out, latest, placement.abstract(abstract))
        state = jax.jit(rebalance.to_slots, out_shardings=state_shardings)(state)  # checkpoints are per expert
        start = int(to_host(state["step"]))
        log(f"resuming {out} from step {start}")
        return state, start
    fresh = lambda: rebalance.to_slots(init_train_state(model_cfg, tc, tx))
    state = jax.jit(fresh, out_shardings=state_shardings)()
    if tc.init_from:
        state = _start_from_run(state, tc.init_from, tx, state_shardings)
        log(f"starting from the parameters of {tc.init_from} (fresh optimizer)")
    return state, 0


def _start_from_run(state: dict, run_dir: str, tx, shardings) -> dict:
    """`state` with the parameters and router state of another run and a fresh optimizer (and
    `state`'s expert placement, if any)."""
    try:
        _, _, params, router_state, _, _ = load_run(run_dir)  # its model was checked by _check_inputs
    except TrainError as e:
        raise TrainError(f"--resume-from: {e}") from None
    placed = {k: v for k, v in state.get("router_state", {}).items() if k.startswith((rebalance.SLOTS, rebalance.LOAD))}
    # the loaded parameters (on this host) into this run's slots, by its placement (replicated)
    held = rebalance.to_slots({"params": params, "opt_state": tx.init(params),
                               "router_state": {k: np.asarray(v) for k, v in placed.items()}})
    new = dict(state, params=held["params"], opt_state=held["opt_state"])
    if router_state:
        other = {k: v for k, v in router_state.items() if not k.startswith((rebalance.SLOTS, rebalance.LOAD))}
        new["router_state"] = {**other, **placed}
    return jax.device_put(new, shardings) if shardings is not None else new


def _step_loop(run: _Run, state: dict, start: int, end: int, train_step, teacher, progress: bool) -> tuple[list[float], dict]:
    """Steps start..end-1 with their hooks; returns the step times (the first, compiling, left
    out) and the last state."""
    tc = run.tc
    eval_step = make_eval_step(run.model_cfg, run.placement)
    val = eval_batches(run.corpus.val, tc.eval_batches, tc.batch_size, tc.seq_len)
    tokens_per_step = tc.batch_size * tc.seq_len
    bar = Progress(tc.steps, start=start, enabled=progress, warmup=1)  # the first step compiles
    last_eval = None
    last_good_ckpt = run.latest
    step_times: list[float] = []
    try:
        for step in range(start, end):
            batch = run.placement.batch(train_batch(run.corpus.train, tc.seed, step, tc.batch_size, tc.seq_len))
            t0 = time.perf_counter()
            extra = () if teacher is None and run.base is None else (teacher, run.base)
            state, m = train_step(state, batch, *extra)
            m = to_host(m)
            dt = time.perf_counter() - t0
            done = step + 1
            if step > start:  # the first step of a process includes compilation
                step_times.append(dt)
            tps = tokens_per_step / np.mean(step_times[-20:]) if step_times else None
            _check_finite(m, done, last_good_ckpt, run.store, bar)
            _log_step(run, done, m, tps, last_eval, bar)
            if tc.rebalance_every and done % tc.rebalance_every == 0:
                state, record = rebalance.re_placed(state, run.model_cfg, tc, run.move)
                if run.primary:
                    run.metrics.append({"kind": "rebalance", "step": done, **record})
            if done % tc.eval_every == 0 or done == tc.steps:
                last_eval = _evaluate_and_log(run, state, done, eval_step, val)
            if done % tc.ckpt_every == 0 or done == end:
                run.store.save(done, run.per_expert(state), {"step": done, "data_position": done,
                                                             "loss": float(m["loss"])})
                last_good_ckpt = done
    finally:
        bar.close()
    return step_times, state


def _check_finite(m: dict, done: int, last_good_ckpt: int | None, store: CheckpointStore, bar: Progress) -> None:
    """Raise NonFiniteLoss (naming the last good checkpoint) when step `done` diverged."""
    if np.isfinite(m["loss"]) and bool(m["params_finite"]):
        return
    bar.close()
    where = f"step {last_good_ckpt} in {store.directory}" if last_good_ckpt is not None else "none was saved"
    raise NonFiniteLoss(f"the loss became {float(m['loss'])} at step {done}; stopping. Last good checkpoint: {where}")


def _log_step(run: _Run, done: int, m: dict, tps: float | None, last_eval: float | None, bar: Progress) -> None:
    """Append the step's metrics.jsonl record (every `log_every` steps) and update the progress bar."""
    if run.primary and (done % run.tc.log_every == 0 or done == run.tc.steps):
        run.metrics.append(_host_metrics(done, m, tps))
    fields = {"loss": f"{float(m['loss']):.3f}"}
    if "max_vio" in m:
        fields["imb"] = f"{float(np.mean(m['max_vio'])):.2f}"
    if last_eval is not None:
        fields["val"] = f"{last_eval:.3f}"
    if tps:
        fields["tok/s"] = f"{tps:,.0f}"
    bar.update(done, fields)


def _evaluate_and_log(run: _Run, state: dict, done: int, eval_step, val: np.ndarray) -> float:
    """Validate the state after step `done`, record it and redraw the plot; returns the validation loss."""
    params, router_state = state["params"], state.get("router_state")
    if run.base is not None:
        params, router_state = finetune.join(run.base, params, router_state)
    ev = evaluate(params, router_state, run.model_cfg, val, eval_step, run.placement)
    ev["val_bpb"] /= run.corpus.bytes_per_token
    if run.primary:
        run.metrics.append({"kind": "eval", "step": done, **ev})
        plot_run(run.metrics.records(), rundir.plot_path(run.out), run.title)
    return ev["val_loss"]


def _write_summary(run: _Run, step_times: list[float], wall_s: float, log) -> dict:
    """summary.json of a finished run, from its metrics; returns it."""
    tc, model_cfg = run.tc, run.model_cfg
    records = run.metrics.records()
    train_recs = [r for r in records if r["kind"] == "train"]
    eval_recs = [r for r in records if r["kind"] == "eval"]
    tokens_per_step = tc.batch_size * tc.seq_len
    summary = {
        "steps": tc.steps,
        "train_loss": train_recs[-1]["loss"] if train_recs else None,
        "val_loss": eval_recs[-1]["val_loss"] if eval_recs else None,
        "val_bpb": eval_recs[-1]["val_bpb"] if eval_recs else None,
        "tokens_per_s": _tokens_per_s(step_times, tokens_per_step, train_recs),
        "wall_s_this_process": wall_s,
        "active_params": model_cfg.num_params(active=True),
        "total_params": model_cfg.num_params(),
        "mesh": tc.mesh,
        "devices": jax.device_count(),
    }
    rundir.write_summary(run.out, summary)
    log(
        f"done: step {tc.steps}, train loss {summary['train_loss']:.4f}, validation loss "
        f"{summary['val_loss']:.4f} ({summary['val_bpb']:.3f} bits/byte)"
        + (f", {summary['tokens_per_s']:,.0f} tokens/s" if summary["tokens_per_s"] else "")
    )
    return summary


def _tokens_per_s(step_times: list[float], tokens_per_step: int, train_recs: list[dict]) -> float | None:
    """Throughput of the steps timed in this process or, when it timed none (it resumed at the
    last step), of the run's earlier records."""
    if step_times:
        return float(tokens_per_step / np.median(step_times))
    earlier = [r["tokens_per_s"] for r in train_recs if r.get("tokens_per_s")]
    return float(np.median(earlier)) if earlier else None
