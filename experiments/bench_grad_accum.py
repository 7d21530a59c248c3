"""Gradient accumulation with a global-scope balance loss: is the second forward worth removing?

The global-scope balance loss of every micro-batch needs the routing counts of the whole step,
known only once every micro-batch has been routed, so a micro-batch's backward pass cannot
start before all forwards are done. `jmoe.train.make_train_step` runs a forward-only pass over
the micro-batches for the counts, then a forward + backward pass per micro-batch. The
alternatives (kept in this script, exact to float rounding) run one differentiated function
over all micro-batches and add the balance losses with the summed counts afterwards:

  two_pass     make_train_step(grad_accum=G): counting pass, then value_and_grad per micro-batch
  keep         one forward per micro-batch, every micro-batch's activations kept for the backward
  recompute    the same with each micro-batch's forward rematerialised (`jax.checkpoint`)
  unsplit      make_train_step(grad_accum=1) on the whole batch, for reference

Rounds are interleaved and the median step time is reported, with each step's temporary
memory as XLA compiled it (`memory_analysis().temp_size_in_bytes`) and the largest difference
of its gradient norm and updated parameters from `two_pass`. Results go to
experiments/results/bench_grad_accum.json.

    python experiments/bench_grad_accum.py            # grad_accum=4, about a minute on 2 cores
    python experiments/bench_grad_accum.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmoe import MoEConfig
from jmoe.layer import moe_aux
from jmoe.nn import LMConfig
from jmoe.nn.transformer import lm_apply, stack_padded, update_lm_state
from jmoe.train import TrainConfig
from jmoe.train.state import init_train_state, make_optimizer
from jmoe.train.trainer import _moe_metrics, cross_entropy, make_train_step

RESULTS = Path(__file__).parent / "results" / "bench_grad_accum.json"
MODEL = LMConfig(d_model=64, n_layers=4, n_heads=4, d_ff=128, max_seq_len=64,
                 moe=MoEConfig(num_experts=8, top_k=2, d_model=64, d_ff=64, aux_loss_coef=0.01))


def make_single_forward_step(model_cfg: LMConfig, tx, schedule, grad_accum: int, recompute: bool):
    """Global-scope accumulation with one forward per micro-batch (one device, no
    distillation): the micro-batches' forwards run under one `jax.value_and_grad`, then each
    layer's MoE loss is recomputed from its routing with the step's counts (`moe_aux`)."""

    def forward(params, tokens, key, router_state):
        logits, aux = lm_apply(params, tokens[:, :-1], model_cfg, state=router_state, key=key)
        return cross_entropy(logits, tokens[:, 1:]), aux

    def with_counts(aux, cfg, counts, seq_len):  # aux: one layer's MoEAux, arrays [M, ...]
        def one(a):
            new = moe_aux(a.routing, jnp.zeros((), jnp.float32), cfg, seq_len=seq_len, global_counts=counts)
            return a.replace(loss=new.loss, balance_loss=new.balance_loss)

        return jax.vmap(one)(aux)

    def step_loss(params, micro, keys, router_state):
        fwd = lambda mb, k: forward(params, mb, k, router_state)
        if recompute:
            fwd = jax.checkpoint(fwd)
        ces, aux = jax.lax.map(lambda x: fwd(*x), (micro, keys))
        counts = jax.lax.stop_gradient(jax.tree.map(lambda c: jnp.sum(c, axis=0), aux.counts(model_cfg)))
        layers = [with_counts(a, model_cfg.moe_for(i), counts[str(i)], micro.shape[-1] - 1)
                  for i, a in zip(model_cfg.moe_layers, aux.moe)]
        moe_losses = sum(a.loss for a in layers)
        stats = jax.vmap(lambda ls: _moe_metrics(list(ls)))(tuple(layers))
        return jnp.mean(ces + moe_losses), (ces, moe_losses, counts, stats)

    def step(state, tokens):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        router_state = state.get("router_state")
        params = state["params"]
        micro = tokens.reshape((grad_accum, tokens.shape[0] // grad_accum) + tokens.shape[1:])
        keys = jax.random.split(key, grad_accum)
        (_, (ces, moe_losses, counts, stats)), grads = jax.value_and_grad(step_loss, has_aux=True)(
            params, micro, keys, router_state
        )
        stats = jax.tree.map(lambda v: jnp.mean(v, axis=0), stats)
        load = stack_padded([counts[str(i)] for i in model_cfg.moe_layers])
        stats["load"] = load / jnp.maximum(jnp.sum(load, axis=-1, keepdims=True), 1.0)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = dict(state, step=state["step"] + 1, data_position=state["data_position"] + 1,
                         params=optax.apply_updates(params, updates), opt_state=opt_state)
        if router_state:
            new_state["router_state"] = update_lm_state(router_state, counts, model_cfg)
        metrics = {"loss": jnp.mean(ces), "aux_loss": jnp.mean(moe_losses), "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state["step"]), **stats}
        return new_state, metrics

    return jax.jit(step, donate_argnums=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3, help="steps per round and variant")
    args = ap.parse_args()

    ga = args.grad_accum
    tc = TrainConfig(steps=1000, batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=ga)
    tx, schedule = make_optimizer(tc)
    batch = jax.random.randint(jax.random.key(1), (args.batch_size, args.seq_len + 1), 0, 256)
    fresh = lambda: init_train_state(MODEL, tc, tx)
    steps = {
        "two_pass": make_train_step(MODEL, tx, schedule, grad_accum=ga),
        "keep": make_single_forward_step(MODEL, tx, schedule, ga, recompute=False),
        "recompute": make_single_forward_step(MODEL, tx, schedule, ga, recompute=True),
        "unsplit": make_train_step(MODEL, tx, schedule, grad_accum=1),
    }

    rows = {}
    first = {}
    for name, fn in steps.items():
        compiled = fn.lower(fresh(), batch).compile()
        mem = compiled.memory_analysis()
        state, m = fn(fresh(), batch)  # compiles for the call path too; the first step's result
        first[name] = (jax.device_get(state["params"]), float(m["grad_norm"]))
        rows[name] = {"temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None, "times_ms": []}
    states = {name: fresh() for name in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                states[name], m = fn(states[name], batch)
            jax.block_until_ready(m)
            rows[name]["times_ms"].append(1e3 * (time.perf_counter() - t0) / args.calls)

    ref_params, ref_norm = first["two_pass"]
    base = statistics.median(rows["two_pass"]["times_ms"])
    print(f"grad_accum={ga}, batch {args.batch_size} x {args.seq_len} bytes, {MODEL.num_params() / 1e6:.2f}M params, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
    print(f"{'step':10} {'median ms':>10} {'vs two_pass':>12} {'temp MiB':>9} {'|d grad_norm|':>14} {'max |d params|':>15}")
    for name, row in rows.items():
        params, norm = first[name]
        row["median_ms"] = statistics.median(row["times_ms"])
        row["ratio_to_two_pass"] = row["median_ms"] / base
        row["grad_norm_diff"] = abs(norm - ref_norm)
        row["max_param_diff"] = max(float(np.max(np.abs(a - b)))
                                    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
        temp = f"{row['temp_bytes'] / 2**20:9.2f}" if row["temp_bytes"] is not None else f"{'?':>9}"
        print(f"{name:10} {row['median_ms']:10.1f} {row['ratio_to_two_pass']:12.3f} {temp} "
              f"{row['grad_norm_diff']:14.2e} {row['max_param_diff']:15.2e}")
    print(f"keep / two_pass = {rows['keep']['ratio_to_two_pass']:.3f} (time), "
          f"{rows['keep']['temp_bytes'] / rows['two_pass']['temp_bytes']:.2f} (memory); "
          f"recompute / two_pass = {rows['recompute']['ratio_to_two_pass']:.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "platform": platform.platform(), "jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
        "model": {"d_model": MODEL.d_model, "n_layers": MODEL.n_layers, "num_experts": MODEL.moe.num_experts,
                  "top_k": MODEL.moe.top_k, "params": MODEL.num_params()},
        "grad_accum": ga, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "rounds": args.rounds, "calls_per_round": args.calls,
        "rows": rows,
    }, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
