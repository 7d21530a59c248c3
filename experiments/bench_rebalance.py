"""Expert-parallel steps with and without re-placing the experts, on a skewed layer.

On 8 simulated CPU devices (data=1,expert=8), an MoE layer (E=16, k=2, d=256, f=512) whose
router sends most tokens to four experts (the tokens share a direction the router favours)
runs forward and backward on the default layout and on the EPLB placement of its own measured
loads with 8 redundant slots (3 slots per device), alternating, for each exchange: padded
all-to-all, dropless (buffers for the worst case) and with capacity factor 1.25 (buffers for
1.25x the mean load per device: a skewed layer drops token-slots there). The placement runs
with the experts held in their slots, as a training run holds them ("eplb"), and with the
experts stored per expert and gathered into their slots every step ("eplb_gathered").

Printed side by side: the median step-time ratio placed / default over the rounds, the share of
token-slots each drops, the excess load of the hottest device ((max - mean) / mean of the
token-slots each device receives), and the bytes one device sends per step, read from the
compiled HLO (as in bench_expert_parallel.py): held in their slots, only tokens move, plus the
sum of the replicated experts' gradients between their copies; gathered, the expert weights
move every step too. Simulated devices share the machine's cores, and the padded exchange sizes
its buffers from the capacity rule, not from the loads: the time a balanced placement saves on
real devices, where the step waits for the most loaded one, is the excess load, not this ratio.
Writes experiments/results/bench_rebalance.json.

    python experiments/bench_rebalance.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_expert_parallel import bytes_sent_per_device  # noqa: E402

import jmoe  # noqa: E402
from jmoe.parallel import ExpertParallel, make_mesh, shard_tree  # noqa: E402
from jmoe.parallel.placement import ExpertPlacement, PlacementStats, excess_load, place  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_rebalance.json"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    if jax.device_count() < 8:
        sys.exit("needs 8 devices: run as a fresh process (it sets XLA_FLAGS itself)")
    cfg = jmoe.MoEConfig(num_experts=16, top_k=2, d_model=256, d_ff=512)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    k1, k2 = jax.random.split(jax.random.key(1))
    direction = jax.random.normal(k1, (cfg.d_model,))
    params["router"]["w"] = params["router"]["w"].at[:, :4].add(0.2 * direction[:, None])
    x = jax.random.normal(k2, (a.tokens, cfg.d_model)) + direction
    _, aux = jmoe.moe_layer(params, x, cfg)
    load = np.asarray(aux.tokens_per_expert, np.float64)[None, : cfg.num_experts]
    mesh = make_mesh("data=1,expert=8")
    default = ExpertPlacement(slots=np.arange(16)[None], num_experts=16, num_devices=8)
    placed = place(PlacementStats(load), "eplb", 8, 24)
    slots = jnp.asarray(placed.slots[0])
    in_slots = dict(params, experts=jax.tree.map(lambda w: w[slots], params["experts"]))
    # (expert parallelism, slots, parameters sharded as a training run keeps them, placement)
    layouts = {"default": (ExpertParallel(mesh, impl="padded"), None, shard_tree(params, mesh), default),
               "eplb": (ExpertParallel(mesh, impl="padded", experts_in_slots=True), slots, shard_tree(in_slots, mesh),
                        placed),
               "eplb_gathered": (ExpertParallel(mesh, impl="padded"), slots, shard_tree(params, mesh), placed)}
    rows = []
    for name, c in (("dropless", cfg), ("capacity 1.25", cfg.replace(dispatch="capacity",
                                                                      dispatch_options=dict(capacity_factor=1.25)))):
        fns, sent = {}, {}
        for layout, (ep, sl, p, _) in layouts.items():
            def loss(p, x, c=c, ep=ep, sl=sl):
                y, aux = jmoe.moe_layer(p, x, c, ep=ep, slots=sl)
                return jnp.sum(y ** 2), aux.dropped_fraction

            fns[layout] = jax.jit(jax.value_and_grad(loss, has_aux=True))
            sent[layout] = bytes_sent_per_device(fns[layout].lower(p, x).compile().as_text())
            jax.block_until_ready(fns[layout](p, x))
        times = {k: [] for k in fns}
        for _ in range(a.rounds):  # alternating, side by side
            for k, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(layouts[k][2], x))
                times[k].append(time.perf_counter() - t0)
        dropped = {k: float(f(layouts[k][2], x)[0][1]) for k, f in fns.items()}
        ratios = {k: [t / d for t, d in zip(times[k], times["default"])] for k in ("eplb", "eplb_gathered")}
        row = {"exchange": name, "step_s": {k: statistics.median(v) for k, v in times.items()},
               "ratio_placed_over_default": statistics.median(ratios["eplb"]),
               "ratio_range": [min(ratios["eplb"]), max(ratios["eplb"])],
               "ratio_gathered_over_default": statistics.median(ratios["eplb_gathered"]),
               "dropped_fraction": dropped,
               "excess_load": {k: float(excess_load(pl, load)[0]) for k, (_, _, _, pl) in layouts.items()},
               "bytes_sent": {k: sum(v.values()) for k, v in sent.items()}, "collectives": sent}
        rows.append(row)
        b = {k: v / 1e6 for k, v in row["bytes_sent"].items()}
        print(f"{name:>14}: step placed / default {row['ratio_placed_over_default']:.2f}x "
              f"({min(ratios['eplb']):.2f}-{max(ratios['eplb']):.2f}), gathered {row['ratio_gathered_over_default']:.2f}x; "
              f"dropped {dropped['default']:.1%} -> {dropped['eplb']:.1%}; excess load "
              f"{row['excess_load']['default']:.2f} -> {row['excess_load']['eplb']:.2f}; bytes sent per device "
              f"{b['default']:.1f} -> {b['eplb']:.1f} MB in slots, {b['eplb_gathered']:.1f} MB gathered", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": "python experiments/bench_rebalance.py" + (f" --rounds {a.rounds}" if a.rounds != 7 else ""),
        "config": cfg.to_dict(), "tokens": a.tokens, "device": f"{jax.device_count()} simulated cpu devices",
        "load": load[0].tolist(), "slots": placed.slots[0].tolist(),
        "expert_bytes": sum(w[0].nbytes for w in jax.tree.leaves(params["experts"])), "rows": rows}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
