"""Grouped-matmul kernels against jax.lax.ragged_dot and a dense batched matmul.

On a GPU or TPU it autotunes the tiling, then times, in bf16 and side by side:
  gmm          jmoe's Pallas grouped matmul (forward, and forward+backward)
  ragged_dot   jax.lax.ragged_dot on the same operands
  dense        a batched matmul [E, M/E, d] x [E, d, f]: the same FLOPs with perfectly equal groups
and the whole dropless FFN with impl="pallas" vs the pure-XLA paths, for Mixtral-like
(E=8, k=2, d=4096, f=14336) and DeepSeek-like (E=256, k=8, d=7168, f=2048) shapes. The group
sizes are router-like (multinomial around the mean), and gmm runs again on Zipf-skewed sizes
(expert popularity 1 / rank, some groups empty at E=256), whose useful FLOPs are the same. It
reports TFLOP/s (forward, and forward+backward counted as 3x the forward's FLOPs: the two
gradient matmuls), the fraction of the chip's bf16 peak, and gmm / dense and gmm / ragged_dot
ratios. Goal: gmm >= 80% of dense's TFLOP/s, forward and forward+backward, on both size
distributions, and faster than ragged_dot.

Without an accelerator it runs the same kernels in Pallas interpret mode at reduced shapes
and records their errors against the references (a correctness run, no timings).

    python experiments/bench_kernels.py [--tokens 8192] [--no-autotune]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jmoe
from jmoe.dispatch.pallas import DEFAULT_TILINGS, autotune, gmm, heuristic_tiling

RESULTS = Path(__file__).parent / "results"
SHAPES = {
    "mixtral": dict(E=8, k=2, d=4096, f=14336),
    "deepseek": dict(E=256, k=8, d=7168, f=2048),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
             "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


def peak_for(kind: str) -> float | None:
    for name, peak in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return peak
    return None


def balanced_sizes(rows: int, groups: int, seed=0) -> jnp.ndarray:
    """Router-like group sizes: multinomial around the mean."""
    p = np.random.default_rng(seed).dirichlet(np.full(groups, 50.0))
    sizes = np.random.default_rng(seed + 1).multinomial(rows, p)
    return jnp.asarray(sizes, jnp.int32)


def zipf_sizes(rows: int, groups: int, seed=0) -> jnp.ndarray:
    """Skewed group sizes: expert e (in a random order) drawn with probability proportional to
    1 / (rank + 1), as a Zipf(1) routing gives."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, groups + 1)
    sizes = rng.multinomial(rows, rng.permutation(p / p.sum()))
    return jnp.asarray(sizes, jnp.int32)


def timeit(fn, *args, repeats=10):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def gmm_error(lhs, rhs, sizes, tilings=DEFAULT_TILINGS, groups: int = 4) -> float:
    """Max relative error of the compiled gmm against plain matmuls of a few groups' rows."""
    out = jax.jit(lambda a, b, s: gmm(a, b, s, tilings=tilings))(lhs, rhs, sizes).astype(jnp.float32)
    ends = np.cumsum(np.asarray(sizes))
    worst = 0.0
    for g in np.linspace(0, len(ends) - 1, groups).astype(int):
        lo, hi = (ends[g - 1] if g else 0), ends[g]
        ref = jnp.dot(lhs[lo:hi], rhs[g], preferred_element_type=jnp.float32)
        worst = max(worst, float(jnp.abs(out[lo:hi] - ref).max() / jnp.abs(ref).max()))
    return worst


def bench_accelerator(args):
    dev = jax.devices()[0]
    kind = dev.device_kind
    peak = peak_for(kind)
    backend = "tpu" if dev.platform == "tpu" else "gpu"
    rows_out = []
    for name, s in SHAPES.items():
        E, k, d, f = s["E"], s["k"], s["d"], s["f"]
        T = args.tokens
        M = T * k
        kl, kr, kg = jax.random.split(jax.random.key(0), 3)
        lhs = jax.random.normal(kl, (M, d), jnp.bfloat16)
        rhs = (jax.random.normal(kr, (E, d, f), jnp.float32) / d**0.5).astype(jnp.bfloat16)
        sizes = balanced_sizes(M, E)
        probe = jax.random.normal(kg, (M, f), jnp.bfloat16)
        tuned, tilings = None, DEFAULT_TILINGS
        if not args.no_autotune:
            tilings = autotune(M, d, f, E, jnp.bfloat16, backend=backend, repeats=5, log=print)
            tuned = tilings.get(backend, M, d, f, E, jnp.bfloat16)
        tiling = tilings.get(backend, M, d, f, E, jnp.bfloat16)
        flops = 2 * M * d * f
        ops = {
            "gmm": lambda a, b, s: gmm(a, b, s, tilings=tilings),
            "ragged_dot": lambda a, b, s: lax.ragged_dot(a, b, s),
            "dense": lambda a, b, s: jnp.einsum("emd,edf->emf", a.reshape(E, M // E, d), b).reshape(M, f),
        }

        def loss_of(op):
            # quadratic in the output, so that the gradient needs the forward's value: with a
            # linear loss the forward matmul is dead code in the gradient's graph, which then
            # holds only the two backward matmuls (and 3 * flops would be counted for 2)
            return lambda a, b, s: 0.5 * jnp.sum(jnp.square(op(a, b, s).astype(jnp.float32)) * probe.astype(jnp.float32))

        fns = {n: jax.jit(op) for n, op in ops.items()}
        grads = {n: jax.jit(jax.value_and_grad(loss_of(op), argnums=(0, 1))) for n, op in ops.items()}
        res = {"shape": name, **s, "tokens": T, "rows": M, "tiling": tiling, "autotuned": tuned}
        res["gmm_max_rel_err"] = gmm_error(lhs, rhs, sizes, tilings)
        for n in fns:
            try:
                tf = timeit(fns[n], lhs, rhs, sizes)
                tb = timeit(grads[n], lhs, rhs, sizes)
            except Exception as e:  # e.g. XLA:GPU's ragged_dot at E=256 (its autotuner found no configuration)
                res[n] = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
                continue
            res[n] = {"fwd_s": tf, "fwd_tflops": flops / tf / 1e12, "fwd_bwd_s": tb, "fwd_bwd_tflops": 3 * flops / tb / 1e12}
            if peak:
                res[n]["fwd_frac_peak"] = flops / tf / peak
        if "failed" in res["gmm"]:
            raise RuntimeError(f"gmm failed on {name}: {res['gmm']['failed']}")
        res["gmm_vs_dense_tflops"] = res["gmm"]["fwd_tflops"] / res["dense"]["fwd_tflops"]
        res["gmm_vs_dense_fwd_bwd_tflops"] = res["gmm"]["fwd_bwd_tflops"] / res["dense"]["fwd_bwd_tflops"]
        zipf = zipf_sizes(M, E)
        res["zipf"] = {"sizes_max_over_mean": float(zipf.max() / (M / E)), "empty_groups": int((zipf == 0).sum()),
                       "gmm_max_rel_err": gmm_error(lhs, rhs, zipf, tilings)}
        tf, tb = timeit(fns["gmm"], lhs, rhs, zipf), timeit(grads["gmm"], lhs, rhs, zipf)
        res["zipf"]["gmm"] = {"fwd_s": tf, "fwd_tflops": flops / tf / 1e12, "fwd_bwd_s": tb,
                              "fwd_bwd_tflops": 3 * flops / tb / 1e12}
        res["zipf"]["gmm_vs_dense_tflops"] = res["zipf"]["gmm"]["fwd_tflops"] / res["dense"]["fwd_tflops"]
        res["zipf"]["gmm_vs_dense_fwd_bwd_tflops"] = res["zipf"]["gmm"]["fwd_bwd_tflops"] / res["dense"]["fwd_bwd_tflops"]
        if "fwd_s" in res["ragged_dot"]:
            res["gmm_speedup_vs_ragged_dot"] = res["ragged_dot"]["fwd_s"] / res["gmm"]["fwd_s"]
        # the whole dropless FFN (routing excluded) per implementation; impl="pallas" runs with the
        # built-in tilings (DEFAULT_TILINGS)
        cfg = jmoe.MoEConfig(num_experts=E, top_k=k, d_model=d, d_ff=f, dtype="bfloat16", param_dtype="bfloat16")
        params = jmoe.init_moe(jax.random.key(1), cfg)
        x = jax.random.normal(jax.random.key(2), (T, d), jnp.bfloat16)
        layer, outputs = {}, {}
        for impl in ["pallas", "ragged_dot", "xla"]:
            c = cfg.replace(impl=impl)
            fn = jax.jit(lambda p, x, c=c: jmoe.moe_layer(p, x, c)[0])
            try:
                layer[impl] = timeit(fn, params, x, repeats=5)
                outputs[impl] = fn(params, x).astype(jnp.float32)
            except Exception as e:  # e.g. out of memory for ragged_dot at DeepSeek scale
                layer[impl] = f"failed: {type(e).__name__}"
        res["layer_fwd_s"] = layer
        if "pallas" in outputs and "xla" in outputs:  # the kernels plugged into the layer, on the device
            scale = float(jnp.abs(outputs["xla"]).max())
            res["layer_pallas_vs_xla_max_rel_err"] = float(jnp.abs(outputs["pallas"] - outputs["xla"]).max()) / scale
            del outputs
        if E * d * f * 3 * 2 < 4e9:  # gradients of both implementations fit beside the weights
            g = {impl: jax.jit(jax.grad(lambda p, c=cfg.replace(impl=impl): jnp.sum(
                jmoe.moe_layer(p, x[:1024], c)[0].astype(jnp.float32) ** 2)))(params) for impl in ("pallas", "xla")}
            res["layer_grad_pallas_vs_xla_max_rel_err"] = max(
                float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max() / jnp.abs(b.astype(jnp.float32)).max())
                for a, b in zip(jax.tree.leaves(g["pallas"]), jax.tree.leaves(g["xla"])))
        rows_out.append(res)
        print(json.dumps(res, indent=1, default=str))
        rd = res["ragged_dot"]
        vs_rd = (f"gmm is {res['gmm_speedup_vs_ragged_dot']:.2f}x ragged_dot (goal > 1)" if "fwd_s" in rd
                 else f"ragged_dot {rd['failed']}")
        z = res["zipf"]
        print(f"{name}: gmm {res['gmm']['fwd_tflops']:.0f} TFLOP/s, dense {res['dense']['fwd_tflops']:.0f}; "
              f"gmm/dense = {res['gmm_vs_dense_tflops']:.2f} forward, {res['gmm_vs_dense_fwd_bwd_tflops']:.2f} "
              f"forward+backward; Zipf sizes {z['gmm_vs_dense_tflops']:.2f} / {z['gmm_vs_dense_fwd_bwd_tflops']:.2f} "
              f"(goal >= 0.80); {vs_rd}; gmm max rel err {res['gmm_max_rel_err']:.1e}", flush=True)
    return {"device": kind, "platform": dev.platform, "peak_bf16_flops": peak, "results": rows_out}


def correctness_on_cpu():
    """Interpret-mode check of both kernel families at reduced shapes."""
    out = []
    for name, s in {"mixtral-like (reduced)": dict(E=8, k=2, d=64, f=96), "deepseek-like (reduced)": dict(E=64, k=8, d=64, f=32)}.items():
        E, k, d, f = s["E"], s["k"], s["d"], s["f"]
        M = 40 * k
        lhs = jax.random.normal(jax.random.key(0), (M, d), jnp.float32).astype(jnp.bfloat16)
        rhs = (jax.random.normal(jax.random.key(1), (E, d, f)) / d**0.5).astype(jnp.bfloat16)
        for kind, sizes in (("balanced", balanced_sizes(M, E)), ("zipf", zipf_sizes(M, E))):
            out.append(interpret_errors(f"{name}, {kind} sizes", s, lhs, rhs, sizes))
    return {"device": "cpu (no accelerator in this run: interpret-mode correctness only, no timings)", "results": out}


def interpret_errors(name: str, s: dict, lhs, rhs, sizes) -> dict:
    """Both kernel families in interpret mode against ragged_dot: forward and both gradients."""
    E, d, f = s["E"], s["d"], s["f"]
    M = lhs.shape[0]
    f32 = lambda a: a.astype(jnp.float32)
    rel = lambda a, ref: float(jnp.abs(f32(a) - f32(ref)).max() / jnp.abs(f32(ref)).max())
    ref = lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32)
    g_ref = jax.grad(lambda a, b: jnp.sum(lax.ragged_dot(a, b, sizes, preferred_element_type=jnp.float32) ** 2),
                     argnums=(0, 1))(lhs, rhs)
    row = {"shape": name, **s, "rows": M, "empty_groups": int((sizes == 0).sum())}
    for backend in ["gpu", "tpu"]:
        op = lambda a, b: gmm(a, b, sizes, backend=backend, interpret=True, preferred_element_type=jnp.float32)
        g = jax.grad(lambda a, b: jnp.sum(op(a, b) ** 2), argnums=(0, 1))(lhs, rhs)
        row[backend] = {
            "tiling": heuristic_tiling(backend, M, d, f, E, jnp.bfloat16),
            "fwd_max_abs_err": float(jnp.abs(op(lhs, rhs) - ref).max()),
            "grad_lhs_max_rel_err": rel(g[0], g_ref[0]),
            "grad_rhs_max_rel_err": rel(g[1], g_ref[1]),
        }
    print(json.dumps(row, indent=1))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--no-autotune", action="store_true")
    args = ap.parse_args(argv)
    if jax.default_backend() == "cpu":
        report = correctness_on_cpu()
        path = RESULTS / "bench_kernels_cpu_interpret.json"
    else:
        report = bench_accelerator(args)
        suffix = "" if args.tokens == 8192 else f"_tokens{args.tokens}"
        path = RESULTS / f"bench_kernels_{report['device'].replace(' ', '_')}{suffix}.json"
    on_cpu = jax.default_backend() == "cpu"  # the interpret-mode run has its own shapes
    report["command"] = "python experiments/bench_kernels.py" + ("" if args.tokens == 8192 or on_cpu
                                                                 else f" --tokens {args.tokens}")
    report["jax"] = jax.__version__
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
