"""The MoE layer and the expert-parallel layer at two versions of jmoe, side by side in one run.

Checks out `--base` (a git revision) into a temporary folder and times the same cases with
that version and with this checkout, in separate processes that alternate (base, this, base,
this, ...) so that drift of the machine's speed hits both alike. Each case is a jitted forward +
backward of one layer; the expert-parallel cases run on 8 simulated CPU devices. Prints the
median time of each version and the ratio this / base, and writes
experiments/results/bench_before_after.json.

    python experiments/bench_before_after.py --base 7209d74
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "bench_before_after.json"

# Runs inside each version: configs from flat dicts (every version reads them), and an
# ExpertParallel built the way that version takes its buffer size.
CHILD = r"""
import json, statistics, sys, time
import jax, jax.numpy as jnp
import jmoe
from jmoe.parallel import ExpertParallel, make_mesh

repeats, tokens = int(sys.argv[1]), int(sys.argv[2])
base = dict(num_experts=8, top_k=2, d_model=256, d_ff=512)
def cfg(**kw):
    return jmoe.MoEConfig.from_dict({**base, **kw})

def timed(fn, *args):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter(); jax.block_until_ready(fn(*args)); ts.append(time.perf_counter() - t)
    return statistics.median(ts)

def grad_fn(c, ep=None):
    def loss(p, x):
        y, aux = jmoe.moe_layer(p, x, c, ep=ep)
        return jnp.sum(jnp.sin(y)) + aux.loss
    return jax.jit(jax.grad(loss, argnums=(0, 1)))

x = jax.random.normal(jax.random.key(1), (tokens, base["d_model"]))
out = {}
for name, c in [("dropless", cfg()), ("capacity", cfg(dispatch="capacity", capacity_factor=1.25)),
                ("dropless_shared_gate", cfg(num_shared_experts=1, d_ff_shared=256, shared_gate=True))]:
    params = jmoe.init_moe(jax.random.key(0), c)
    out[name] = timed(grad_fn(c), params, x)
mesh = make_mesh("data=2,expert=4")
for impl in ["padded", "ragged", "allgather"]:
    try:  # the buffer size as an argument of ExpertParallel
        ep, c = ExpertParallel(mesh, impl=impl, capacity_factor=2.0), cfg()
    except TypeError:  # the buffer size from the layer's capacity dispatch
        ep, c = ExpertParallel(mesh, impl=impl), cfg(dispatch="capacity", capacity_factor=2.0)
    params = jmoe.init_moe(jax.random.key(0), c)
    out[f"ep_{impl}"] = timed(grad_fn(c, ep), params, x)
print(json.dumps(out))
"""


def run_version(tree: Path, repeats: int, tokens: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(repeats), str(tokens)], env=env, cwd=tree,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"the benchmark failed in {tree}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each version")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per case and run")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True)
    if rev.returncode:
        sys.exit(f"--base {args.base!r} is not a git revision of {ROOT}")
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        base_tree.mkdir()
        archive = subprocess.run(["git", "archive", args.base], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base_tree)], input=archive, check=True)
        runs: dict[str, list[dict]] = {"base": [], "this": []}
        for r in range(args.rounds):
            for label, tree in (("base", base_tree), ("this", ROOT)):
                runs[label].append(run_version(tree, args.repeats, args.tokens))
                print(f"round {r + 1}/{args.rounds}: {label} done", flush=True)
    rows = []
    print(f"{'case':<22} {'base ms':>9} {'this ms':>9} {'this/base':>9}")
    for case in runs["base"][0]:
        b = statistics.median(run[case] for run in runs["base"])
        t = statistics.median(run[case] for run in runs["this"])
        spread = [run[case] / base[case] for run, base in zip(runs["this"], runs["base"])]
        rows.append({"case": case, "base_s": b, "this_s": t, "ratio": t / b, "ratio_per_round": spread})
        print(f"{case:<22} {b * 1e3:9.1f} {t * 1e3:9.1f} {t / b:9.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": f"python experiments/bench_before_after.py --base {args.base}",
        "base": rev.stdout.strip(), "tokens": args.tokens, "rounds": args.rounds, "repeats": args.repeats,
        "cases": "jitted forward+backward of one layer, E=8 k=2 d=256 f=512; ep_*: data=2,expert=4 on 8 "
                 "simulated CPU devices, capacity factor 2",
        "rows": rows,
    }, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
