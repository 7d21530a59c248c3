"""Expert-parallel MoE layer: communication volume per device and step time per mesh shape.

For each mesh (data x expert on 8 devices) and each token exchange it compiles the layer's
forward pass, reads every collective in the compiled HLO, and counts the bytes one device
sends (all-to-all: (n-1)/n of its buffers; all-gather: (n-1)/n of the gathered result;
reduce-scatter: (n-1)/n of its input; all-reduce: 2 (n-1)/n). That is divided by the tokens
each device holds and set against the minimum: every token-slot whose expert lives on
another device of its group travels there and back, d values each way.

On CPU `ragged_all_to_all` is not implemented, so the "ragged" exchange runs through an
all-gather emulation there; the table also lists what the native primitive would send
(exactly the accepted rows, plus the count matrix), computed from the same routing.

The layer uses the capacity dispatch with capacity factor 2 (buffers of twice the mean
load per destination); a dropless layer sizes the padded and ragged buffers for the worst
case instead (every slot of a shard to one device).

Step times are forward+backward on simulated CPU devices that share the machine's cores:
they check that every mesh runs, not how fast a real cluster would be.

    python experiments/bench_expert_parallel.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np

import jmoe
from jmoe.parallel import ExpertParallel, make_mesh

RESULTS = Path(__file__).parent / "results" / "bench_expert_parallel.json"
DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1, "s64": 8, "f64": 8}
COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-to-all|all-gather|reduce-scatter|all-reduce)(-start)?\(")


def shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", text):
        if dtype not in DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * DTYPE_BYTES[dtype]
    return total


def group_size(line: str) -> int:
    """Devices in each replica group of a collective's HLO line, in any of XLA's spellings:
    explicit ({{0,1,2,3},...}), iota ([G,n]<=[N]) or mesh axes (mesh['x'=2,'y'=4] {'y'})."""
    explicit = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
    if explicit:
        return len(explicit.group(1).split(","))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if iota:
        return int(iota.group(2))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if mesh:
        sizes = {a: int(v) for a, v in re.findall(r"'(\w+)'=(\d+)", mesh.group(1))}
        return math.prod(sizes[a] for a in re.findall(r"'(\w+)'", mesh.group(2)))
    return 1


def bytes_sent_per_device(hlo: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in hlo.splitlines():
        m = COLLECTIVE.search(line)
        if not m:
            continue
        result, op = m.group(1), m.group(2)
        n = group_size(line)
        if n <= 1:
            continue
        b = shape_bytes(result)
        sent = {
            "all-to-all": b * (n - 1) / n,
            "all-gather": b * (n - 1) / n,
            "reduce-scatter": b * (n - 1),
            "all-reduce": 2 * b * (n - 1) / n,
        }[op]
        out[op] = out.get(op, 0.0) + sent
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if jax.device_count() < 8:
        sys.exit("needs 8 devices: run as a fresh process (it sets XLA_FLAGS itself) or on an 8-device host")

    cfg = jmoe.MoEConfig(num_experts=8, top_k=2, d_model=256, d_ff=512, dispatch="capacity",
                         dispatch_options=dict(capacity_factor=2.0))
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (args.tokens, cfg.d_model))
    itemsize = 4
    _, ref_aux = jmoe.moe_layer(params, x, cfg)
    ids = np.asarray(ref_aux.routing.expert_ids)

    def loss(p, x, ep):
        y, aux = jmoe.moe_layer(p, x, cfg, ep=ep)
        return jnp.sum(y) + aux.loss

    single = jax.jit(jax.grad(lambda p, x: loss(p, x, None)))
    jax.block_until_ready(single(params, x))
    t_single = statistics.median(_time(single, params, x) for _ in range(args.repeats))

    rows = []
    for mesh_spec in ["data=1,expert=8", "data=2,expert=4", "data=4,expert=2", "data=8,expert=1"]:
        mesh = make_mesh(mesh_spec)
        n = mesh.shape["expert"]
        shards = mesh.size
        t_local = args.tokens // shards
        # the minimum: remote slots there and back
        e_local = cfg.num_experts // n
        tok_shard = np.arange(args.tokens) // t_local
        dev_in_group = tok_shard % n
        remote = (ids // e_local) != dev_in_group[:, None]
        minimum = 2 * remote.sum() * cfg.d_model * itemsize / args.tokens
        for impl in ["padded", "ragged", "allgather"]:
            ep = ExpertParallel(mesh, impl=impl)
            fwd = jax.jit(lambda p, x: jmoe.moe_layer(p, x, cfg, ep=ep)[0])
            hlo = fwd.lower(params, x).compile().as_text()
            per_op = bytes_sent_per_device(hlo)
            measured = sum(per_op.values()) / t_local
            g = jax.jit(jax.grad(lambda p, x: loss(p, x, ep)))
            jax.block_until_ready(g(params, x))
            t = statistics.median(_time(g, params, x) for _ in range(args.repeats))
            row = {
                "mesh": mesh_spec, "impl": impl, "bytes_per_token": measured, "minimum_bytes_per_token": float(minimum),
                "ratio_to_minimum": measured / minimum if minimum else None, "collectives": per_op,
                "step_s": t, "step_vs_single_device": t / t_single,
            }
            if impl == "ragged" and n > 1:
                # what the native primitive sends: every accepted remote row there and back, plus counts
                native = (2 * remote.sum() * cfg.d_model * itemsize + remote.sum() * 4 + 2 * shards * n * n * 4) / args.tokens
                row["native_ragged_bytes_per_token"] = float(native)
            rows.append(row)
            ratio = f"x{row['ratio_to_minimum']:5.2f}" if minimum else "    -"
            print(f"{mesh_spec:<17} {impl:<9} {measured:10.0f} B/token (min {minimum:7.0f}, {ratio})"
                  + (f"  native ragged {row['native_ragged_bytes_per_token']:8.0f}" if "native_ragged_bytes_per_token" in row else "")
                  + f"  step {t * 1e3:7.1f} ms ({t / t_single:.2f}x one device)", flush=True)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": "python experiments/bench_expert_parallel.py",
        "config": {**cfg.to_dict(), "tokens": args.tokens},
        "device": f"{jax.device_count()} simulated {jax.devices()[0].platform} devices",
        "single_device_step_s": t_single,
        "rows": rows,
    }, indent=1))
    print(f"wrote {RESULTS}")


def _time(fn, *a):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*a))
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
