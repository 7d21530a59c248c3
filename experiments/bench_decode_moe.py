"""Where a decoding step's MoE layer loses time on XLA:CPU, and what the chunk sizes change.

Three measurements, each side by side in one process (rounds interleaved, median):

  chunks    the dropless chunk loop (`jmoe.dispatch.chunked`) at decoding sizes with the
            chunk row counts of `chunk_sizes` as they are (1, 2 and 4 rows for blocks under
            128) against the previous rule (multiples of 8 only), "gather" beside them, and
            the loop on experts in the `ExpertList` layout (what the engine runs on CPU);
            the engine's block size (`serving_block_size`), forward only.
  training  forward + backward of the dropless layer at training sizes (block 512, the
            default) with the current rule against the same rule plus the small chunks at
            every block size: why the small chunks are kept to small blocks.
  layout    one token-slot's expert from the stacked `[E, d, f]` weights
            (`lax.dynamic_index_in_dim`, what every jmoe dispatch does), from a static slice
            `w[i]` in a `lax.switch` branch, and from E separate arrays picked by
            `lax.switch` (the `jmoe.experts.ExpertList` serving layout): XLA:CPU copies a
            slice of the stack before its matmul, static or not.

Shapes: d_model 512; Mixtral-like E=8, k=2, d_ff=1152 and DeepSeek-V3-like E=64, k=6,
d_ff=160 (the two models of experiments/bench_decode.py), uniform random routing.

    python experiments/bench_decode_moe.py           # about 4 minutes on 2 cores
    python experiments/bench_decode_moe.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jmoe
import jmoe.dispatch.chunked as chunked
from jmoe.dispatch import get_dispatch
from jmoe.experts import ExpertList
from jmoe.infer.forward import serving_block_size

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode_dispatch import random_routing  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_decode_moe.json"
D_MODEL = 512
SHAPES = {"mixtral": dict(num_experts=8, top_k=2, d_ff=1152), "deepseek_v3": dict(num_experts=64, top_k=6, d_ff=160)}
CURRENT = chunked.chunk_sizes


def multiples_of_8(block_size):
    """The rule before the small chunks: multiples of max(8, block_size // 16)."""
    step = min(block_size, max(8, block_size // 16))
    sizes = list(range(step, block_size + 1, step))
    return tuple(sizes if sizes[-1] == block_size else sizes + [block_size])


def small_everywhere(block_size):
    """Chunks of 1, 2, 4 rows at every block size (the alternative to `CURRENT`)."""
    sizes = multiples_of_8(block_size)
    return tuple(s for s in (1, 2, 4) if s < sizes[0]) + sizes


def compiled(fn, args, sizes_rule=None):
    """fn jitted and compiled for args, with `chunk_sizes` replaced by sizes_rule while tracing."""
    jax.clear_caches()  # jax reuses traces of the same function: retrace with this rule
    chunked.chunk_sizes = sizes_rule or CURRENT
    try:
        return jax.jit(lambda *a: fn(*a)).lower(*args).compile()
    finally:
        chunked.chunk_sizes = CURRENT
        jax.clear_caches()


def race(fns, args, rounds):
    """{name: median seconds} over interleaved rounds."""
    times = {n: [] for n in fns}
    for _ in range(rounds):
        for n, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def setup(shape, T, seed=0):
    cfg = jmoe.MoEConfig(d_model=D_MODEL, **shape)
    params = jmoe.init_moe(jax.random.key(seed), cfg)["experts"]
    x = jax.random.normal(jax.random.key(T), (T, D_MODEL))
    return cfg, params, x, random_routing(jax.random.key(1000 + T), T, shape["num_experts"], shape["top_k"])


def bench_chunks(rounds, log):
    rows = []
    for name, shape in SHAPES.items():
        for T in (1, 2, 4, 8):
            cfg, params, x, r = setup(shape, T)
            split = ExpertList.split(params)
            block = serving_block_size(T, shape["top_k"], shape["num_experts"], 512)
            c = cfg.replace(dispatch="dropless", dispatch_options=dict(impl="xla", block_size=block))
            drop = lambda p, s, x, r: get_dispatch("dropless")(p, x, r, c)[0]  # noqa: E731
            g = cfg.replace(dispatch="gather")
            args = (params, split, x, r)
            fns = {"chunks_now": compiled(drop, args),
                   "chunks_multiples_of_8": compiled(drop, args, multiples_of_8),
                   "gather": compiled(lambda p, s, x, r: get_dispatch("gather")(p, x, r, g)[0], args),
                   "chunks_split": compiled(lambda p, s, x, r: get_dispatch("dropless")(s, x, r, c)[0], args)}
            ref = np.asarray(fns["chunks_multiples_of_8"](*args))
            diff = max(float(np.abs(np.asarray(f(*args)) - ref).max()) for f in fns.values())
            s = race(fns, args, rounds)
            row = {"model": name, **shape, "tokens": T, "block_size": block, "seconds": s, "max_abs_difference": diff,
                   "now_over_multiples_of_8": s["chunks_now"] / s["chunks_multiples_of_8"],
                   "gather_over_now": s["gather"] / s["chunks_now"],
                   "split_over_best_stacked": s["chunks_split"] / min(s["chunks_now"], s["gather"])}
            rows.append(row)
            log(f"  chunks {name:<12} T={T}: " + "  ".join(f"{n} {v * 1e3:.2f} ms" for n, v in s.items())
                + f"  now/multiples_of_8 {row['now_over_multiples_of_8']:.2f}  gather/now {row['gather_over_now']:.2f}"
                + f"  split/best stacked {row['split_over_best_stacked']:.2f}")
    return rows


def bench_training(rounds, log):
    rows = []
    for name, shape, T in (("mixtral", dict(num_experts=8, top_k=2, d_ff=1024), 4096),
                           ("deepseek_v3", dict(num_experts=64, top_k=6, d_ff=256), 2048)):
        cfg, params, x, r = setup(shape, T)
        c = cfg.replace(dispatch="dropless", dispatch_options=dict(impl="xla"))
        loss = lambda p, x, r: jnp.sum(get_dispatch("dropless")(p, x, r, c)[0] ** 2)  # noqa: E731
        step = jax.value_and_grad(loss, argnums=(0, 1))
        fns = {"block512_now": compiled(step, (params, x, r)),
               "block512_small_chunks": compiled(step, (params, x, r), small_everywhere)}
        s = race(fns, (params, x, r), rounds)
        row = {"model": name, **shape, "tokens": T, "block_size": 512, "seconds": s,
               "small_chunks_over_now": s["block512_small_chunks"] / s["block512_now"]}
        rows.append(row)
        log(f"  training {name:<12} T={T}: " + "  ".join(f"{n} {v * 1e3:.1f} ms" for n, v in s.items())
            + f"  small_chunks/now {row['small_chunks_over_now']:.2f}")
    return rows


def bench_layout(rounds, log):
    rows = []
    for name, shape in SHAPES.items():
        for T in (1, 8):
            cfg, params, x, r = setup(shape, T)
            E, k = shape["num_experts"], shape["top_k"]
            act = jax.nn.silu

            def ffn(p, xt):
                return (act(xt @ p["w_gate"]) * (xt @ p["w_up"])) @ p["w_down"]

            def slots(pick):
                def run(p, x, r):
                    toks = jnp.arange(T * k) // k
                    ys = lax.map(lambda a: pick(p, a[0], lax.dynamic_slice_in_dim(x, a[1], 1))[0],
                                 (r.expert_ids.reshape(-1), toks))
                    return jnp.einsum("tk,tkd->td", r.weights, ys.reshape(T, k, -1))
                return run

            dynamic = lambda p, e, xt: ffn(jax.tree.map(lambda w: lax.dynamic_index_in_dim(w, e, False), p), xt)  # noqa
            static = lambda p, e, xt: lax.switch(  # noqa: E731
                e, [lambda p, xt, i=i: ffn(jax.tree.map(lambda w: w[i], p), xt) for i in range(E)], p, xt)
            separate = lambda p, e, xt: lax.switch(  # noqa: E731
                e, [lambda p, xt, i=i: ffn(p[i], xt) for i in range(E)], p, xt)
            split = [jax.tree.map(lambda w: jnp.array(np.asarray(w[i])), params) for i in range(E)]
            fns = {"stacked_dynamic_index": compiled(slots(dynamic), (params, x, r)),
                   "stacked_static_slice_switch": compiled(slots(static), (params, x, r)),
                   "separate_arrays_switch": compiled(slots(separate), (split, x, r))}
            args = {"stacked_dynamic_index": params, "stacked_static_slice_switch": params,
                    "separate_arrays_switch": split}
            wrapped = {n: (lambda f, a: lambda x, r: f(a, x, r))(f, args[n]) for n, f in fns.items()}
            ref = np.asarray(wrapped["stacked_dynamic_index"](x, r))
            diff = max(float(np.abs(np.asarray(f(x, r)) - ref).max()) for f in wrapped.values())
            s = race(wrapped, (x, r), rounds)
            base = s["stacked_dynamic_index"]
            row = {"model": name, **shape, "tokens": T, "seconds": s, "max_abs_difference": diff,
                   "over_stacked_dynamic_index": {n: v / base for n, v in s.items()}}
            rows.append(row)
            log(f"  layout {name:<12} T={T} (one slot at a time): " + "  ".join(
                f"{n} {v * 1e3:.2f} ms ({v / base:.2f})" for n, v in s.items()))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--only", nargs="+", choices=["chunks", "training", "layout"], default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    out = {"command": "python experiments/bench_decode_moe.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "jax": jax.__version__, "backend": jax.default_backend(), "rounds": args.rounds,
           "statistic": "median seconds of single jitted calls, variants interleaved"}
    for part, fn in (("chunks", bench_chunks), ("training", bench_training), ("layout", bench_layout)):
        if args.only is None or part in args.only:
            log(f"{part}:")
            out[part] = fn(args.rounds, log)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
