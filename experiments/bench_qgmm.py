"""Quantized grouped matmul (`qgmm`) against the bf16 grouped matmul (`gmm`) on the same experts.

On a GPU it times, side by side in one run, at the Mixtral expert shape (E=8, d=4096, f=14336)
and from decoding sizes (a few rows per expert, where reading the weights is the cost) to
prefill sizes:
  gmm        the bf16 weights [E, d, f]
  qgmm b     the same weights quantized group-wise (b = 8, 4, 3 bits, group size 64, bf16
             scales and zero points), dequantized tile by tile in the kernel
and reports each time, its ratio to gmm's (> 1: qgmm faster), the weight bytes each reads and the
bandwidth that implies; and the whole dropless layer (impl="pallas") at decoding token counts
on bf16 and on 4-bit experts. Goal (issue: decoding faster than float where memory bound):
4-bit qgmm faster than gmm at the decoding sizes. Its errors against the float grouped matmul
on the dequantized weights are recorded too.

Without an accelerator it runs the kernels in Pallas interpret mode at reduced shapes and
records their errors (forward and input gradient, every bit width; a correctness run, no
timings).

    python experiments/bench_qgmm.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import balanced_sizes, timeit, zipf_sizes  # noqa: E402

import jmoe  # noqa: E402
from jmoe.dispatch.pallas import gmm, qgmm  # noqa: E402
from jmoe.quant import quantize_expert_weights  # noqa: E402
from jmoe.quant.qarray import quantize_rtn  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPE = dict(E=8, k=2, d=4096, f=14336)
ROWS = (16, 64, 256, 1024, 4096, 16384)  # token-slots: 8 tokens x 2 ... a prefill of 8,192 tokens
BITS = (8, 4, 3)
GROUP = 64
DECODE_ROWS = 64  # at most this many token-slots counts as decoding (8 rows per expert)


def rel_err(a, ref) -> float:
    a, ref = a.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.abs(a - ref).max() / jnp.abs(ref).max())


def bench_gpu() -> dict:
    dev = jax.devices()[0]
    E, k, d, f = SHAPE["E"], SHAPE["k"], SHAPE["d"], SHAPE["f"]
    w = (jax.random.normal(jax.random.key(0), (E, d, f), jnp.float32) / d**0.5).astype(jnp.bfloat16)
    quant = {b: quantize_rtn(w, b, GROUP) for b in BITS}
    gmm_f = jax.jit(lambda a, b, s: gmm(a, b, s))
    qgmm_f = jax.jit(lambda a, q, s: qgmm(a, q, s))
    rows_out = []
    for M in ROWS:
        lhs = jax.random.normal(jax.random.key(M), (M, d), jnp.bfloat16)
        sizes = balanced_sizes(M, E)
        t_float = timeit(gmm_f, lhs, w, sizes, repeats=20)
        row = {"rows": M, "gmm_s": t_float, "gmm_weight_bytes": int(w.size * 2),
               "gmm_weight_gb_per_s": w.size * 2 / t_float / 1e9}
        ref = gmm_f(lhs, w, sizes)
        for b, q in quant.items():
            t = timeit(qgmm_f, lhs, q, sizes, repeats=20)
            deq_ref = lax.ragged_dot(lhs, q.dequantize(jnp.bfloat16), sizes, preferred_element_type=jnp.float32)
            out = qgmm_f(lhs, q, sizes)
            row[f"qgmm{b}"] = {"s": t, "speedup_vs_gmm": t_float / t, "weight_bytes": q.nbytes,
                               "weight_gb_per_s": q.nbytes / t / 1e9,
                               "max_rel_err_vs_dequantized": rel_err(out, deq_ref),
                               "max_rel_err_vs_float": rel_err(out, ref)}
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    zipf = zipf_sizes(ROWS[-1], E)
    lhs = jax.random.normal(jax.random.key(1), (ROWS[-1], d), jnp.bfloat16)
    zipf_row = {"rows": ROWS[-1], "gmm_s": timeit(gmm_f, lhs, w, zipf),
                "qgmm4_s": timeit(qgmm_f, lhs, quant[4], zipf)}
    # the whole dropless layer (routing included) at decoding token counts, bf16 vs 4-bit experts
    cfg = jmoe.MoEConfig(num_experts=E, top_k=k, d_model=d, d_ff=f, dtype="bfloat16", param_dtype="bfloat16",
                         dispatch_options=dict(impl="pallas"))
    params = jmoe.init_moe(jax.random.key(2), cfg)
    q_params = {**params, "experts": quantize_expert_weights(params["experts"], 4, group_size=GROUP, method="rtn")}
    layer = jax.jit(lambda p, x: jmoe.moe_layer(p, x, cfg)[0])
    layers = []
    for T in (1, 8, 32):
        x = jax.random.normal(jax.random.key(T), (T, d), jnp.bfloat16)
        tf, tq = timeit(layer, params, x, repeats=20), timeit(layer, q_params, x, repeats=20)
        layers.append({"tokens": T, "bf16_s": tf, "int4_s": tq, "speedup": tf / tq})
        print(json.dumps(layers[-1]), flush=True)
    decode = [r for r in rows_out if r["rows"] <= DECODE_ROWS]
    goal_met = all(r["qgmm4"]["speedup_vs_gmm"] > 1 for r in decode)
    print(f"4-bit qgmm / gmm speed-up at decoding sizes: "
          + ", ".join(f"{r['rows']} rows {r['qgmm4']['speedup_vs_gmm']:.2f}x" for r in decode)
          + f" (goal > 1: {'met' if goal_met else 'not met'})", flush=True)
    return {"device": dev.device_kind, "platform": dev.platform, **SHAPE, "group_size": GROUP, "bits": list(BITS),
            "results": rows_out, "zipf": zipf_row, "layer_decode": layers, "decode_rows": DECODE_ROWS,
            "goal": "4-bit qgmm faster than bf16 gmm at decoding sizes", "goal_met": goal_met}


def correctness_on_cpu() -> dict:
    """Interpret-mode errors at reduced shapes, balanced and Zipf-skewed groups (some empty)."""
    E, d, f, M = 8, 128, 96, 80
    w = jax.random.normal(jax.random.key(0), (E, d, f)) / d**0.5
    lhs = jax.random.normal(jax.random.key(1), (M, d))
    probe = jax.random.normal(jax.random.key(2), (M, f))
    out = []
    for kind, sizes in (("balanced", balanced_sizes(M, E)), ("zipf", zipf_sizes(M, E))):
        for b in (2, 3, 4, 8):
            q = quantize_rtn(w, b, 32)
            deq = q.dequantize()
            y = qgmm(lhs, q, sizes, interpret=True)
            g = jax.grad(lambda a: jnp.sum(qgmm(a, q, sizes, interpret=True) * probe))(lhs)
            g_ref = jax.grad(lambda a: jnp.sum(lax.ragged_dot(a, deq, sizes) * probe))(lhs)
            row = {"sizes": kind, "empty_groups": int((sizes == 0).sum()), "bits": b,
                   "fwd_max_rel_err": rel_err(y, lax.ragged_dot(lhs, deq, sizes)),
                   "grad_lhs_max_rel_err": rel_err(g, g_ref),
                   "weight_bytes": q.nbytes, "float32_weight_bytes": int(w.size * 4)}
            out.append(row)
            print(json.dumps(row), flush=True)
    return {"device": "cpu (no accelerator in this run: interpret-mode correctness only, no timings)",
            "E": E, "d": d, "f": f, "rows": M, "group_size": 32, "results": out}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.parse_args(argv)
    if jax.default_backend() == "cpu":
        report, path = correctness_on_cpu(), RESULTS / "bench_qgmm_cpu_interpret.json"
    else:
        report = bench_gpu()
        path = RESULTS / f"bench_qgmm_{report['device'].replace(' ', '_')}.json"
    report["command"] = "python experiments/bench_qgmm.py"
    report["jax"] = jax.__version__
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
