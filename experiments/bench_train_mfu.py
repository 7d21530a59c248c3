"""Model FLOPs utilisation (MFU) of a whole training step on one accelerator.

The `base` preset's model (d=1024, 16 layers, 64 fine-grained experts of width 512, top-6, a
shared expert, bf16 compute) takes optimizer steps of `--batch` sequences of `--seq-len` tokens
on one device, as `jmoe train` runs them (AdamW, global-norm clip, the balance loss). The step
time is the median of `--steps` steps after two compiling ones. Model FLOPs per step are those
of the math, whatever the implementation does: 6 x (the parameters a token uses: every weight
but the embedding table, with the k routed experts of each MoE layer, the router and the output
projection; the norms' scales, 0.01% of them, included) per token, plus causal attention's
6 x 2 x L x S x H x Dh per token (half of the full S x S scores, forward and backward). MFU = model FLOPs / step time / the chip's bf16
peak (its data sheet's dense figure), reported also against a bf16 8192^3 matmul measured on
the same chip, the peak a program can reach. MaxText publishes 54.9% MFU for Mixtral-8x7B on
TPU v5p; the line says where this step stands.

On a CPU it runs the `tiny` preset for a few steps to check the script (no MFU is claimed).
Writes experiments/results/bench_train_mfu_<device>.json.

    python experiments/bench_train_mfu.py [--batch 8 --seq-len 2048 --steps 10]
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

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import peak_for, timeit  # noqa: E402

from jmoe.nn import LMConfig, preset  # noqa: E402
from jmoe.train import TrainConfig  # noqa: E402
from jmoe.train.state import init_train_state, make_optimizer  # noqa: E402
from jmoe.train.trainer import make_train_step  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MAXTEXT_MIXTRAL_MFU = 0.549  # Mixtral-8x7B on TPU v5p, MaxText's published figure


def model_flops_per_token(cfg: LMConfig, seq_len: int) -> float:
    """Training FLOPs per token of the math: 6 x matmul parameters a token uses + causal attention."""
    matmul = cfg.num_params(active=True) - cfg.vocab_size * cfg.d_model  # the embedding is a lookup
    if cfg.tie_embeddings:  # ... but then its table is also the output projection
        matmul += cfg.vocab_size * cfg.d_model
    attention = 6 * 2 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim / 2  # QK^T and AV, causal
    return 6 * matmul + attention


def matmul_tflops(n: int = 8192) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    return 2 * n**3 / timeit(jax.jit(lambda a, b: a @ b), a, b) / 1e12


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args(argv)
    dev = jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    name = "tiny" if on_cpu else "base"
    model = preset(name)["model"]
    batch, seq_len, steps = (2, 64, 3) if on_cpu else (a.batch, a.seq_len, a.steps)
    if seq_len > model.max_seq_len:
        sys.exit(f"--seq-len {seq_len} exceeds the {name} model's max_seq_len {model.max_seq_len}")
    tc = TrainConfig(steps=1000, batch_size=batch, seq_len=seq_len, warmup_steps=10)
    tx, schedule = make_optimizer(tc)
    state = jax.jit(lambda: init_train_state(model, tc, tx))()
    step = make_train_step(model, tx, schedule)
    rng = np.random.default_rng(0)
    times, losses = [], []
    for i in range(steps + 2):
        tokens = jnp.asarray(rng.integers(0, model.vocab_size, (batch, seq_len + 1)), jnp.int32)
        t0 = time.perf_counter()
        state, m = step(state, tokens)
        losses.append(float(m["loss"]))  # waits for the step
        if i >= 2:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = model_flops_per_token(model, seq_len) * batch * seq_len
    report = {"command": "python experiments/bench_train_mfu.py", "device": dev.device_kind, "platform": dev.platform,
              "jax": jax.__version__, "preset": name, "model": model.to_dict(), "batch": batch, "seq_len": seq_len,
              "steps_timed": steps, "step_s": step_s, "step_s_range": [min(times), max(times)],
              "tokens_per_s": batch * seq_len / step_s, "model_flops_per_step": flops,
              "active_params": model.num_params(active=True), "total_params": model.num_params(),
              "losses_finite": bool(np.all(np.isfinite(losses))), "maxtext_mixtral_mfu": MAXTEXT_MIXTRAL_MFU}
    if on_cpu:
        report["note"] = "a CPU run checks the script only; MFU is measured on an accelerator"
        print(f"{name} on cpu: {step_s * 1e3:.0f} ms per step of {batch * seq_len} tokens; losses finite: "
              f"{report['losses_finite']}")
    else:
        peak = peak_for(dev.device_kind)
        report["peak_bf16_flops"] = peak
        report["matmul_tflops"] = matmul_tflops()
        report["mfu"] = flops / step_s / peak if peak else None
        report["mfu_vs_matmul"] = flops / step_s / (report["matmul_tflops"] * 1e12)
        print(f"{name} on {dev.device_kind}: {step_s * 1e3:.1f} ms per step of {batch * seq_len:,} tokens, "
              f"{flops / step_s / 1e12:.0f} model TFLOP/s: MFU "
              + (f"{report['mfu']:.1%}" if peak else "n/a (unknown peak)")
              + f" of the data sheet's peak, {report['mfu_vs_matmul']:.1%} of a measured bf16 matmul "
              f"({report['matmul_tflops']:.0f} TFLOP/s); MaxText's Mixtral-8x7B on TPU v5p: {MAXTEXT_MIXTRAL_MFU:.1%}")
    path = RESULTS / f"bench_train_mfu_{dev.device_kind.replace(' ', '_')}.json"
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
