"""Forward and forward+backward time of the MoE layer against the dense limit.

For each shape it times, side by side in one run (rounds interleaved, median reported):
  dropless      jmoe dropless dispatch, impl="xla" (fused chunked grouped FFN)
  capacity      jmoe capacity dispatch, capacity_factor=1.25
  ragged_dot    jmoe dropless dispatch, impl="ragged_dot" (jax.lax.ragged_dot)
  dense_all     run every expert on every token, weight by the routing
  limit         one dense SwiGLU FFN over T*k tokens: the same useful FLOPs, no routing

and prints each time with its ratio to `limit`. Results go to
experiments/results/bench_moe_layer.json.

    python experiments/bench_moe_layer.py            # full run (several minutes on 2 cores)
    python experiments/bench_moe_layer.py --quick    # fewer repeats, skips the slowest rows' backward
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

import jmoe
from jmoe.experts import ffn

SHAPES = [
    dict(num_experts=8, top_k=2, d_model=512, d_ff=1024),
    dict(num_experts=64, top_k=8, d_model=512, d_ff=256),
]
TOKENS = 4096
RESULTS = Path(__file__).parent / "results" / "bench_moe_layer.json"


def make_layer_fns(cfg):
    def fwd(params, x):
        y, aux = jmoe.moe_layer(params, x, cfg)
        return y, aux.loss

    def loss(params, x):
        y, aux = jmoe.moe_layer(params, x, cfg)
        return jnp.sum(y) + aux.loss

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1)))


def make_limit_fns(activation):
    def fwd(p, x):
        return ffn(p, x, activation)

    def loss(p, x):
        return jnp.sum(ffn(p, x, activation))

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1)))


def time_once(fn, args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def run_shape(shape, repeats, quick, log):
    E, k = shape["num_experts"], shape["top_k"]
    base = jmoe.MoEConfig(**shape)
    params = jmoe.init_moe(jax.random.key(0), base)
    x = jax.random.normal(jax.random.key(1), (TOKENS, base.d_model))
    limit_params = jax.tree.map(lambda a: a[0], params["experts"])
    x_limit = jax.random.normal(jax.random.key(2), (TOKENS * k, base.d_model))

    variants = {
        "dropless": (base.replace(dispatch="dropless", dispatch_options=dict(impl="xla")),),
        "capacity": (base.replace(dispatch="capacity", dispatch_options=dict(capacity_factor=1.25)),),
        "ragged_dot": (base.replace(dispatch="dropless", dispatch_options=dict(impl="ragged_dot")),),
        "dense_all": (base.replace(dispatch="dense"),),
    }
    fns = {}
    for name, (cfg,) in variants.items():
        f, g = make_layer_fns(cfg)
        fns[name] = (f, g, (params, x))
    f, g = make_limit_fns(base.activation)
    fns["limit"] = (f, g, (limit_params, x_limit))

    # the slow baselines get fewer repeats; their backward is skipped with --quick
    slow = {"ragged_dot", "dense_all"}
    times = {name: {"forward": [], "forward_backward": []} for name in fns}
    for name, (f, g, args) in fns.items():
        log(f"  compiling {name} ...")
        jax.block_until_ready(f(*args))
        if not (quick and name in slow):
            jax.block_until_ready(g(*args))
    for r in range(repeats):
        for name, (f, g, args) in fns.items():
            if name in slow and r >= max(1, repeats // 3):
                continue
            times[name]["forward"].append(time_once(f, args))
            if not (quick and name in slow):
                times[name]["forward_backward"].append(time_once(g, args))
        log(f"  round {r + 1}/{repeats} done")

    out = {}
    for name, t in times.items():
        out[name] = {kind: (statistics.median(v) if v else None) for kind, v in t.items()}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="3 repeats, no backward for the slow baselines")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    log = lambda m: print(m, flush=True)

    results = []
    for shape in SHAPES:
        label = f"E={shape['num_experts']} k={shape['top_k']} d={shape['d_model']} f={shape['d_ff']} T={TOKENS}"
        log(f"{label}:")
        res = run_shape(shape, repeats, args.quick, log)
        results.append({"shape": {**shape, "tokens": TOKENS}, "seconds": res})

    lines = []
    header = f"{'shape':<34} {'variant':<11} {'fwd ms':>9} {'fwd/limit':>9} {'fwd+bwd ms':>11} {'f+b/limit':>9}"
    lines.append(header)
    lines.append("-" * len(header))
    verdicts = []
    for entry in results:
        s = entry["shape"]
        label = f"E={s['num_experts']} k={s['top_k']} d={s['d_model']} f={s['d_ff']}"
        sec = entry["seconds"]
        lim_f, lim_b = sec["limit"]["forward"], sec["limit"]["forward_backward"]
        entry["ratio_to_limit"] = {}
        for name in ["limit", "dropless", "capacity", "ragged_dot", "dense_all"]:
            f, b = sec[name]["forward"], sec[name]["forward_backward"]
            rf = f / lim_f
            rb = b / lim_b if b is not None else None
            entry["ratio_to_limit"][name] = {"forward": rf, "forward_backward": rb}
            b_ms = f"{b * 1e3:11.1f}" if b is not None else f"{'-':>11}"
            rb_s = f"{rb:9.2f}" if rb is not None else f"{'-':>9}"
            lines.append(f"{label:<34} {name:<11} {f * 1e3:9.1f} {rf:9.2f} {b_ms} {rb_s}")
        speedup = sec["ragged_dot"]["forward"] / sec["dropless"]["forward"]
        entry["dropless_speedup_over_ragged_dot"] = speedup
        ok_limit = entry["ratio_to_limit"]["dropless"]["forward"] <= 1.3
        verdicts.append(f"{label}: dropless forward {entry['ratio_to_limit']['dropless']['forward']:.2f}x limit "
                        f"(goal <= 1.3x: {'met' if ok_limit else 'NOT met'}); "
                        f"{speedup:.1f}x faster than ragged_dot")
        if s["num_experts"] == 64:
            verdicts[-1] += f" (goal >= 5x at E=64: {'met' if speedup >= 5 else 'NOT met'})"
    print()
    print("\n".join(lines))
    print()
    print("\n".join(verdicts))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python experiments/bench_moe_layer.py" + (" --quick" if args.quick else ""),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "repeats": repeats,
        "statistic": "median seconds",
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results, "table": lines, "verdicts": verdicts}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
