"""FSSDP against expert parallelism: bytes one device sends per training step of an MoE layer,
as the tokens per expert grow, and where the two cross.

On 8 simulated CPU devices, for each total token count it compiles the forward and backward of
one MoE layer (E=8, k=2, d=256, f=512, dropless) three ways and reads every collective of the
compiled HLO (bytes one device sends, as in bench_expert_parallel.py):

  ep        expert parallelism on data=1,expert=8 with the padded all-to-all at capacity factor 2
            (the bytes grow with the tokens)
  ep_min    the least any token exchange sends: every token-slot whose expert is on another
            device there and back, d values each way, forward and backward (4 crossings)
  fssdp     FSSDP on data=8: the experts in use materialised on every device and their
            gradients sent back (the bytes follow the experts, not the tokens)

The crossover is where a line through ep_min's bytes per token meets fssdp's bytes per step
(all experts in use), in tokens per expert: FSSDP sends less above it. Step times on simulated
devices share the machine's cores and check only that each mode runs.
Writes experiments/results/bench_fssdp.json.

    python experiments/bench_fssdp.py
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
from jmoe.parallel.fssdp import FSSDP_RULES  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_fssdp.json"


def step_bytes(cfg, params, x, ep) -> tuple[float, dict]:
    """Bytes one device sends in the compiled forward + backward of the layer."""
    g = jax.jit(jax.grad(lambda p, x: jnp.sum(jmoe.moe_layer(p, x, cfg, ep=ep)[0] ** 2)))
    per_op = bytes_sent_per_device(g.lower(params, x).compile().as_text())
    return sum(per_op.values()), per_op


def step_time(cfg, params, x, ep, repeats: int) -> float:
    g = jax.jit(jax.grad(lambda p, x: jnp.sum(jmoe.moe_layer(p, x, cfg, ep=ep)[0] ** 2)))
    jax.block_until_ready(g(params, x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(g(params, x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    if jax.device_count() < 8:
        sys.exit("needs 8 devices: run as a fresh process (it sets XLA_FLAGS itself)")
    cfg = jmoe.MoEConfig(num_experts=8, top_k=2, d_model=256, d_ff=512)
    cap = cfg.replace(dispatch="capacity", dispatch_options=dict(capacity_factor=2.0))
    params = jmoe.init_moe(jax.random.key(0), cfg)
    ep_mesh, fs_mesh = make_mesh("data=1,expert=8"), make_mesh("data=8")
    ep, fs = ExpertParallel(ep_mesh, impl="padded"), ExpertParallel(fs_mesh, impl="fssdp")
    fs_params = shard_tree(params, fs_mesh, FSSDP_RULES)
    itemsize = 4
    rows = []
    for T in a.tokens:
        x = jax.random.normal(jax.random.key(1), (T, cfg.d_model))
        _, aux = jmoe.moe_layer(params, x, cfg)
        ids = np.asarray(aux.routing.expert_ids)
        t_local = T // 8
        remote = (ids // 1) != (np.arange(T) // t_local)[:, None]  # one expert per device on data=1,expert=8
        ep_min = 4 * remote.sum() * cfg.d_model * itemsize / 8  # there and back, forward and backward, per device
        ep_bytes, ep_ops = step_bytes(cap, params, x, ep)
        fs_bytes, fs_ops = step_bytes(cfg, fs_params, x, fs)
        row = {"tokens": T, "tokens_per_expert": T * cfg.top_k / cfg.num_experts, "ep_bytes": ep_bytes,
               "ep_min_bytes": float(ep_min), "fssdp_bytes": fs_bytes, "ep_collectives": ep_ops,
               "fssdp_collectives": fs_ops, "ep_step_s": step_time(cap, params, x, ep, a.repeats),
               "fssdp_step_s": step_time(cfg, fs_params, x, fs, a.repeats)}
        rows.append(row)
        print(f"{T:6d} tokens ({row['tokens_per_expert']:6.0f} per expert): ep {ep_bytes / 1e6:7.2f} MB, ep minimum "
              f"{ep_min / 1e6:7.2f} MB, fssdp {fs_bytes / 1e6:7.2f} MB per device and step; step ep "
              f"{row['ep_step_s'] * 1e3:.0f} ms, fssdp {row['fssdp_step_s'] * 1e3:.0f} ms", flush=True)
    # ep_min grows linearly with the tokens: its bytes per token-per-expert, from the largest run
    slope = rows[-1]["ep_min_bytes"] / rows[-1]["tokens_per_expert"]
    crossover = rows[-1]["fssdp_bytes"] / slope
    print(f"crossover: FSSDP sends less than the least expert-parallel exchange above {crossover:.0f} tokens per "
          f"expert per device group ({crossover * cfg.num_experts / cfg.top_k:.0f} tokens per step)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": "python experiments/bench_fssdp.py" + ("" if a.tokens == [512, 2048, 8192] else
                                                          " --tokens " + " ".join(map(str, a.tokens))),
        "config": cfg.to_dict(), "device": f"{jax.device_count()} simulated {jax.devices()[0].platform} devices",
        "rows": rows, "crossover_tokens_per_expert": crossover,
        "expert_bytes": 3 * cfg.d_model * cfg.d_ff * itemsize,
    }, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
