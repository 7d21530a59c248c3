"""Gather vs dropless dispatch at decoding sizes: where does "gather" stop paying?

A decoding step gives the MoE layer T tokens (one per sequence of the batch), so T*k
token-slots, often fewer than the E experts. For each shape and T this times, side by side
in one run (rounds interleaved, median of the rounds reported), the jitted forward dispatch
`(expert_params, x [T, d], routing) -> y [T, d]`:

  gather          jmoe "gather": a loop over the T*k slots, each reading its expert's weights
  dropless        jmoe "dropless", impl="xla", default options (block_size=512)
  dropless_b32    the same with block_size=32 (chunks of 8..32 rows)
  dropless_serving  the same with the block size the inference engine gives a step of T
                  tokens (`jmoe.infer.forward.serving_block_size`): what gather is compared to
  gather_batched  alternative kept here: w[expert_ids] materialised as [T*k, d, f], one
                  batched matrix-vector product
  gather_unique   alternative kept here: the U = min(T*k, E) distinct selected experts, each
                  read once and run on all T tokens, combined with a [T, U] weight matrix

Routing is uniform at random (k distinct experts per token, all slots used). It prints each
time and gather's ratio to dropless, checks that every variant gives the same output, and
reports the largest T*k/E up to which gather is at least as fast as dropless: the threshold
of `jmoe.dispatch.gather.decode_dispatch`. Results go to
experiments/results/bench_decode_dispatch.json.

    python experiments/bench_decode_dispatch.py            # about 4 minutes on 2 cores
    python experiments/bench_decode_dispatch.py --quick    # 5 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jmoe
from jmoe.dispatch import get_dispatch
from jmoe.dispatch.gather import GATHER_MAX_SLOTS_PER_EXPERT, decode_dispatch
from jmoe.experts import ffn
from jmoe.infer.forward import serving_block_size
from jmoe.routing import Routing

D_MODEL = 512
SHAPES = [
    dict(num_experts=8, top_k=2, d_ff=1024),
    dict(num_experts=64, top_k=2, d_ff=256),
    dict(num_experts=64, top_k=6, d_ff=256),
]
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128]
VARIANTS = ["gather", "dropless", "dropless_b32", "dropless_serving", "gather_batched", "gather_unique"]
RESULTS = Path(__file__).parent / "results" / "bench_decode_dispatch.json"


def random_routing(key, T, E, k):
    """k distinct uniformly random experts per token, softmax weights, every slot used."""
    k_ids, k_w = jax.random.split(key)
    ids = jnp.argsort(jax.random.uniform(k_ids, (T, E)), axis=-1)[:, :k].astype(jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(k_w, (T, k)), axis=-1)
    logits = jnp.zeros((T, E))
    return Routing(expert_ids=ids, weights=weights, probs=jax.nn.softmax(logits), logits=logits,
                   mask=jnp.ones((T, k), bool))


def gather_batched(expert_params, x, routing, cfg):
    """w[expert_ids] gathered to [T*k, d, f], then one batched matrix-vector product."""
    T, k = routing.expert_ids.shape
    ids = routing.expert_ids.reshape(-1)
    params = jax.tree.map(lambda w: w[ids], expert_params)
    xs = jnp.repeat(x, k, axis=0)[:, None, :]  # [T*k, 1, d]
    ys = ffn(params, xs, cfg.activation, cfg.dtype)[:, 0].reshape(T, k, -1)
    w = jnp.where(routing.mask, routing.weights, 0.0)
    return jnp.einsum("tk,tkd->td", w, ys.astype(jnp.float32)).astype(ys.dtype)


def gather_unique(expert_params, x, routing, cfg):
    """Each of the U = min(T*k, E) distinct selected experts read once, run on all T tokens."""
    E = expert_params["w_up"].shape[0]
    T, k = routing.expert_ids.shape
    U = min(T * k, E)
    ids = jnp.where(routing.mask, routing.expert_ids, E)
    uids = jnp.unique(ids.reshape(-1), size=U, fill_value=E)  # [U], padded with E
    w = jnp.where(routing.mask, routing.weights, 0.0)
    combine = jnp.einsum("tk,tku->ut", w, (ids[:, :, None] == uids).astype(jnp.float32))  # [U, T]

    def body(acc, args):
        u, c = args

        def run():
            p = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, u, keepdims=False), expert_params)
            return ffn(p, x, cfg.activation, cfg.dtype).astype(jnp.float32)

        y = lax.cond(u < E, run, lambda: jnp.zeros(x.shape, jnp.float32))
        return acc + c[:, None] * y, None

    acc, _ = lax.scan(body, jnp.zeros(x.shape, jnp.float32), (uids, combine))
    return acc.astype(x.dtype if cfg.dtype is None else cfg.dtype)


def variant_fns(cfg, T):
    """{name: jitted (expert_params, x, routing) -> y} for steps of T tokens."""
    serving_block = serving_block_size(T, cfg.top_k, cfg.num_experts, 512)

    def registered(name, c):
        return jax.jit(lambda p, x, r: get_dispatch(name)(p, x, r, c)[0])

    return {
        "gather": registered("gather", cfg.replace(dispatch="gather")),
        "dropless": registered("dropless", cfg.replace(dispatch="dropless", dispatch_options=dict(impl="xla"))),
        "dropless_b32": registered(
            "dropless", cfg.replace(dispatch="dropless", dispatch_options=dict(impl="xla", block_size=32))
        ),
        "dropless_serving": registered(
            "dropless", cfg.replace(dispatch="dropless", dispatch_options=dict(impl="xla", block_size=serving_block))
        ),
        "gather_batched": jax.jit(lambda p, x, r: gather_batched(p, x, r, cfg)),
        "gather_unique": jax.jit(lambda p, x, r: gather_unique(p, x, r, cfg)),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def time_once(fn, args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def run_shape(shape, tokens, rounds, log):
    E, k = shape["num_experts"], shape["top_k"]
    cfg = jmoe.MoEConfig(d_model=D_MODEL, **shape)
    params = jmoe.init_moe(jax.random.key(0), cfg)["experts"]
    cases, fns_of = {}, {}
    max_diff = 0.0
    for T in tokens:
        fns = fns_of[T] = variant_fns(cfg, T)
        x = jax.random.normal(jax.random.key(T), (T, D_MODEL))
        args = (params, x, random_routing(jax.random.key(1000 + T), T, E, k))
        ref = np.asarray(fns["dropless"](*args))
        for name, f in fns.items():
            diff = float(np.max(np.abs(np.asarray(f(*args)) - ref)))  # also compiles
            max_diff = max(max_diff, diff)
            if diff > 1e-4:
                raise RuntimeError(f"{name} differs from dropless by {diff} at E={E} k={k} T={T}")
        cases[T] = args
    log(f"  compiled; outputs agree (max abs difference {max_diff:.1e})")
    times = {T: {name: [] for name in VARIANTS} for T in tokens}
    for r in range(rounds):
        for T, args in cases.items():
            for name, f in fns_of[T].items():
                times[T][name].append(time_once(f, args))
        log(f"  round {r + 1}/{rounds} done")
    return {T: {name: statistics.median(v) for name, v in t.items()} for T, t in times.items()}, max_diff


def crossover(rows):
    """Where gather stops being faster than dropless, in T*k/E, over `rows` sorted by T.

    Returns (last_win, first_loss, interpolated): the largest T*k/E with gather <= dropless
    there and at every smaller T, the next measured T*k/E (None if gather never loses), and
    the T*k/E where gather/dropless crosses 1, linear between those two rows (None if
    gather never loses).
    """
    last, loss = None, None
    for row in rows:
        if row["gather_over_dropless"] > 1:
            loss = row
            break
        last = row
    if loss is None:
        return last["slots_per_expert"], None, None
    if last is None:
        return 0.0, loss["slots_per_expert"], loss["slots_per_expert"]
    (x0, r0), (x1, r1) = ((row["slots_per_expert"], row["gather_over_dropless"]) for row in (last, loss))
    return x0, x1, x0 + (1 - r0) / (r1 - r0) * (x1 - x0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="5 rounds")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rounds = 5 if args.quick else args.rounds
    log = lambda m: print(m, flush=True)

    results = []
    lines = []
    header = (f"{'shape':<22} {'T':>3} {'T*k/E':>6} " + " ".join(f"{v:>14}" for v in VARIANTS)
              + f" {'gather/dropless':>15} {'decode_dispatch':>15}")
    lines += [header + "   (ms)", "-" * len(header)]
    for shape in SHAPES:
        E, k, f = shape["num_experts"], shape["top_k"], shape["d_ff"]
        label = f"E={E} k={k} f={f}"
        log(f"{label} d={D_MODEL}:")
        sec, max_diff = run_shape(shape, TOKENS, rounds, log)
        rows = []
        for T in TOKENS:
            s = sec[T]
            choice = decode_dispatch(T, k, E)
            row = {
                "tokens": T,
                "slots_per_expert": T * k / E,
                "seconds": s,
                "gather_over_dropless": s["gather"] / s["dropless_serving"],
                "gather_over_dropless_b512": s["gather"] / s["dropless"],
                "gather_over_dropless_b32": s["gather"] / s["dropless_b32"],
                "decode_dispatch": choice,
                "choice_over_best": s["gather" if choice == "gather" else "dropless_serving"]
                / min(s["gather"], s["dropless_serving"]),
            }
            rows.append(row)
            lines.append(f"{label:<22} {T:>3} {T * k / E:>6.3g} " + " ".join(f"{s[v] * 1e3:>14.2f}" for v in VARIANTS)
                         + f" {row['gather_over_dropless']:>15.2f} {choice:>15}")
        last_win, first_loss, cross = crossover(rows)
        results.append({
            "shape": {**shape, "d_model": D_MODEL}, "rows": rows, "max_abs_difference": max_diff,
            "gather_wins_up_to_slots_per_expert": last_win, "dropless_wins_from_slots_per_expert": first_loss,
            "crossover_slots_per_expert": cross,
        })

    crossings = [r["crossover_slots_per_expert"] for r in results if r["crossover_slots_per_expert"] is not None]
    implied = min(crossings) if crossings else None
    worst = max(row["choice_over_best"] for r in results for row in r["rows"])
    verdicts = [
        f"E={r['shape']['num_experts']} k={r['shape']['top_k']}: gather <= dropless up to T*k/E = "
        f"{r['gather_wins_up_to_slots_per_expert']:g}, dropless faster at {r['dropless_wins_from_slots_per_expert']}, "
        f"crossing (interpolated) at {r['crossover_slots_per_expert'] or float('nan'):.2f}" for r in results
    ]
    verdicts.append(f"implied threshold: gather while T*k <= {implied or float('nan'):.2f} E (the earliest crossing); "
                    f"decode_dispatch uses T*k <= {GATHER_MAX_SLOTS_PER_EXPERT} E, at worst {worst:.2f}x "
                    f"the faster of gather and dropless")
    print()
    print("\n".join(lines))
    print()
    print("\n".join(verdicts))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python experiments/bench_decode_dispatch.py" + (" --quick" if args.quick else ""),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": cpu_name(),
        "jax": jax.__version__,
        "rounds": rounds,
        "statistic": "median seconds of single jitted forward calls, rounds interleaved",
        "routing": "uniform random, k distinct experts per token, every slot used",
        "variants": VARIANTS,
    }
    threshold = {"implied_slots_per_expert": implied, "decode_dispatch_slots_per_expert": GATHER_MAX_SLOTS_PER_EXPERT,
                 "worst_choice_over_best": worst}
    args.out.write_text(json.dumps({"meta": meta, "threshold": threshold, "results": results, "table": lines,
                                    "verdicts": verdicts}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
