"""jmoe (jit, XLA:CPU) vs transformers (PyTorch, CPU) on the same weights and inputs.

Cases, each timed side by side (median of repeats; both frameworks on the same 2 threads):
  block/mixtral   the MoE block alone, Mixtral layout scaled to CPU (E=8, k=2, d=1024, f=3584)
  block/olmoe     the MoE block alone, OLMoE-like fine-grained experts (E=64, k=8, d=1024, f=512)
  model/mixtral   a whole 4-layer Mixtral-style model forward
  model/olmoe     a whole 4-layer OLMoE-style model forward
Weights come from a randomly initialised transformers model, saved and loaded with
`jmoe.io.hf`; outputs are checked to agree before timing. Prints each time and the ratio
jmoe / transformers (goal: <= 1), and writes experiments/results/bench_vs_transformers.json.

    python experiments/bench_vs_transformers.py [--tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers as T

import jmoe
from jmoe.io import hf
from jmoe.nn import lm_apply

RESULTS = Path(__file__).parent / "results" / "bench_vs_transformers.json"


def configs(layers):
    common = dict(vocab_size=4096, num_hidden_layers=layers, max_position_embeddings=4096)
    return {
        "mixtral": T.MixtralConfig(**common, hidden_size=1024, intermediate_size=3584, num_attention_heads=16,
                                   num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2),
        "olmoe": T.OlmoeConfig(**common, hidden_size=1024, intermediate_size=512, num_attention_heads=16,
                               num_key_value_heads=16, num_experts=64, num_experts_per_tok=8),
    }


def build(arch, cfg, root):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    path = Path(root) / arch
    model.save_pretrained(path)
    return model, path


def median_time(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def compare(case: str, theirs, ours, repeats: int) -> dict:
    """Check that both give the same output, then time each (median); one result row."""
    with torch.no_grad():
        ref = theirs()
        ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
        out = np.asarray(ours())
        err = float(np.abs(out - ref).max() / np.abs(ref).max())
        t_hf = median_time(theirs, repeats)
    t_j = median_time(lambda: jax.block_until_ready(ours()), repeats)
    print(f"{case:<15} transformers {t_hf * 1e3:8.1f} ms   jmoe {t_j * 1e3:8.1f} ms   ratio {t_j / t_hf:.2f}   "
          f"(rel err {err:.1e})", flush=True)
    return {"case": case, "transformers_s": t_hf, "jmoe_s": t_j, "ratio": t_j / t_hf, "rel_err": err}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for arch, cfg in configs(4).items():
            model, path = build(arch, cfg, root)
            lm_cfg, params = hf.load(path)
            B, S = args.tokens // 512, 512
            ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, S))

            # -- the MoE block alone, on the hidden states entering layer 0's FFN
            block = model.model.layers[0].mlp
            x = np.random.default_rng(1).standard_normal((B, S, cfg.hidden_size)).astype(np.float32)
            xt = torch.tensor(x)
            moe_params = params["layers"]["0"]["moe"]
            moe_fn = jax.jit(lambda p, x: jmoe.moe_layer(p, x, lm_cfg.moe)[0])
            xj = jnp.asarray(x)
            rows.append(compare(f"block/{arch}", lambda: block(xt), lambda: moe_fn(moe_params, xj), args.repeats))

            # -- the whole model forward
            lm_fn = jax.jit(lambda p, t: lm_apply(p, t, lm_cfg)[0])
            idj, idt = jnp.asarray(ids), torch.tensor(ids)
            rows.append(compare(f"model/{arch}", lambda: model(idt).logits, lambda: lm_fn(params, idj), args.repeats))
            del model
    worst = max(r["ratio"] for r in rows)
    verdict = f"jmoe / transformers time: worst {worst:.2f} (goal <= 1: {'met' if worst <= 1 else 'NOT met'})"
    print(verdict)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": f"python experiments/bench_vs_transformers.py --tokens {args.tokens}",
        "torch": torch.__version__, "transformers": T.__version__, "jax": jax.__version__, "threads": threads,
        "rows": rows, "verdict": verdict,
    }, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
