"""Training-step time of each adapter on a frozen FFN, against plain LoRA at equal trainable
parameters.

One dense SwiGLU FFN (d, f) on T tokens, frozen; the step is the forward and the gradient
with respect to the adapter's parameters (what fine-tuning computes). The frozen weights are
arguments of the compiled step, as in fine-tuning: closed over, they would be constants that
XLA folds into products at compile time (minutes of compiling, and not the step fine-tuning
runs). Adapters, sized to about the same trainable parameters:
  lora     rank E * r on gate, up and down
  mixlora  E LoRA experts of rank r, top-k (MixLoRA)
  smora    one LoRA of rank E * r, k * r active ranks per token (SMoRA)
  dynmole  E LoRA experts of rank r per projection, hybrid routing (DynMoLE)
  frozen   the frozen FFN's forward and its input gradient alone (the floor)
Rounds are interleaved and the median is reported, with each ratio to plain LoRA measured in
the same run; memory is the compiled step's scratch memory (XLA's memory analysis).
Goal: MixLoRA at most 1.3x plain LoRA's step time.

    python experiments/bench_adapters.py            # d=512 f=1408 T=4096, 11 rounds
    python experiments/bench_adapters.py --quick    # smaller, 3 rounds (a smoke run)
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

from jmoe.adapters import AdapterConfig
from jmoe.experts import ffn, init_ffn
from jmoe.registry import ADAPTERS

RESULTS = Path(__file__).parent / "results" / "bench_adapters.json"


def adapters(E: int, k: int, r: int) -> dict[str, AdapterConfig]:
    return {
        "lora": AdapterConfig(kind="lora", rank=E * r),
        "mixlora": AdapterConfig(kind="mixlora", rank=r, num_experts=E, top_k=k),
        "smora": AdapterConfig(kind="smora", rank=E * r, top_k=k * r),
        "dynmole": AdapterConfig(kind="dynmole", rank=r, num_experts=E, top_k=k),
    }


def count(tree) -> int:
    return sum(int(a.size) for a in jax.tree.leaves(tree))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    d, f, T, E, k, r = (128, 352, 1024, 8, 2, 4) if args.quick else (512, 1408, 4096, 8, 2, 8)
    rounds = 3 if args.quick else args.rounds
    log = lambda m: print(m, flush=True)

    base = init_ffn(jax.random.key(0), d, f, "swiglu")
    x = jax.random.normal(jax.random.key(1), (T, d))
    probe = jax.random.normal(jax.random.key(2), (T, d))
    shapes = {"gate": (d, f), "up": (d, f), "down": (f, d)}
    steps, sizes = {}, {}
    for name, cfg in adapters(E, k, r).items():
        kind = ADAPTERS.get(cfg.kind)
        params = kind.init(jax.random.key(3), shapes, cfg, "float32")
        params = jax.tree.map(lambda a: a + 0.01, params)  # B != 0: a trained adapter's work
        state = kind.init_state(shapes, cfg) if kind.init_state else None

        def loss(p, x, base, probe, kind=kind, cfg=cfg, state=state):
            y, aux = kind.apply(base, p, x, "swiglu", cfg, state=state)
            return jnp.sum(y * probe) + aux.loss

        steps[name] = (jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params)
        sizes[name] = count(params)
    frozen = lambda p, x, base, probe: jnp.sum(ffn(base, x, "swiglu") * probe)
    steps["frozen"] = (jax.jit(jax.value_and_grad(frozen, argnums=1)), {})
    sizes["frozen"] = 0
    inputs = (x, base, probe)  # the frozen weights are arguments, as in fine-tuning (not constants XLA folds)
    memory = {}
    for name, (fn, p) in steps.items():
        log(f"compiling {name} ({sizes[name]:,} trainable parameters)")
        jax.block_until_ready(fn(p, *inputs))
        stats = fn.lower(p, *inputs).compile().memory_analysis()
        memory[name] = int(stats.temp_size_in_bytes) if stats is not None else None  # the step's scratch memory
    times = {name: [] for name in steps}
    for i in range(rounds):
        for name, (fn, p) in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(p, *inputs))
            times[name].append(time.perf_counter() - t0)
        log(f"round {i + 1}/{rounds}")
    med = {n: statistics.median(t) for n, t in times.items()}
    # per-round ratios to plain LoRA (same round, so the machine's drift cancels)
    ratios = {n: [a / b for a, b in zip(times[n], times["lora"])] for n in steps}
    rows = [{"adapter": n, "trainable_params": sizes[n], "step_ms": 1e3 * med[n], "temp_bytes": memory[n],
             "memory_ratio_to_lora": memory[n] / memory["lora"] if memory[n] and memory["lora"] else None,
             "ratio_to_lora": statistics.median(ratios[n]), "ratio_min": min(ratios[n]), "ratio_max": max(ratios[n])}
            for n in steps]
    print(f"\n{'adapter':<9} {'trainable':>10} {'step ms':>9} {'x lora':>7} {'range':>13} {'scratch MB':>11} {'x lora':>7}")
    for row in rows:
        mem = row["temp_bytes"] / 1e6 if row["temp_bytes"] is not None else float("nan")
        mr = row["memory_ratio_to_lora"] if row["memory_ratio_to_lora"] is not None else float("nan")
        print(f"{row['adapter']:<9} {row['trainable_params']:>10,} {row['step_ms']:>9.1f} {row['ratio_to_lora']:>7.2f} "
              f"{row['ratio_min']:>6.2f}-{row['ratio_max']:<6.2f} {mem:>11.1f} {mr:>7.2f}")
    mix = next(r for r in rows if r["adapter"] == "mixlora")["ratio_to_lora"]
    met = mix <= 1.3
    verdict = f"MixLoRA step {mix:.2f}x plain LoRA's at equal trainable parameters (goal <= 1.3x: " \
              f"{'met' if met else 'NOT met'})"
    print("\n" + verdict)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python experiments/bench_adapters.py" + (" --quick" if args.quick else ""),
            "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "jax": jax.__version__, "rounds": rounds,
            "shape": {"d_model": d, "d_ff": f, "tokens": T, "num_experts": E, "top_k": k, "rank": r},
            "statistic": "median seconds; ratios per round, median and range"}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "verdict": verdict, "goal_met": met}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
