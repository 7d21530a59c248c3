"""Pre-gating (Read-ME) at small scale: routing every MoE layer from the first MoE layer's input,
against each layer routing its own input, for quality and for the expert cache of offloading.

Two variants of the tiny MoE (8 experts per layer, top-2), same batches per seed:
  top2     each layer's router on its own input (the routing zoo's baseline)
  pregate  each layer's router on the first MoE layer's input (`router="pregate"`): every
           layer's experts are known once that input is, so the cross-layer gate (the next
           layer's router, which offloading prefetches by) is exact

Each trained model decodes --prompts prompts (64-byte slices of the validation split) greedily,
--new-tokens tokens at batch 1, with its routing recorded; the trace is replayed through an
LRU expert cache of k .. E slots per layer, with the cross-layer gate's prefetch and without
(`jmoe.infer.cachesim`, the hit rates the offloading engine counts). Claims, paired by seed:
pre-gating keeps per-layer routing's validation loss (margin 0.02 nats, about 1.5%; Read-ME
reports its decoupled router costs no quality), and it raises the decode hit rate of a cache
of 2k slots with prefetch (Read-ME's pre-gating serves expert caching and prefetch). Writes
experiments/results/pregate.{json,png}; runs and traces are cached by configuration and code
version.

    python experiments/pregate.py [--steps 600] [--seeds 0 1 2] [--prompts 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

from _harness import SEEDS, cached  # noqa: E402

MARGIN = 0.02
VARIANTS = ("top2", "pregate")


def decode_hit_rates(run_dir: str, seed: int, prompts: int, new_tokens: int) -> dict:
    """Hit rates of an LRU cache per size, with and without the gate's prefetch, and the
    gate's top-k recall per MoE layer, on a greedy decoding trace of the run."""
    from jmoe.infer import Engine
    from jmoe.infer.cachesim import hit_rate_curve
    from jmoe.infer.load import open_model
    from jmoe.infer.predict import gate_prefetch, trace_gate_accuracy
    from jmoe.infer.trace import recorder_for

    model = open_model(run_dir).load()
    cfg = model.cfg
    val = _zoo.corpus().val
    rng = np.random.default_rng(seed)
    texts = [val[s: s + 64].tolist() for s in rng.integers(0, val.size - 64, prompts)]
    rec = recorder_for(cfg)
    Engine(cfg, model.params, model.state, batch_size=1).generate(texts, max_new_tokens=new_tokens, recorder=rec)
    trace = rec.trace()
    moe = cfg.moe_for(cfg.moe_layers[0])
    sizes = list(range(moe.top_k, moe.num_experts + 1))
    return {"sizes": sizes, "lru": hit_rate_curve(trace, sizes, ("lru",))["hit_rate"]["lru"],
            "lru_gate": hit_rate_curve(trace, sizes, ("lru",), prefetch=gate_prefetch(trace))["hit_rate"]["lru"],
            "gate_recall": trace_gate_accuracy(trace), "tokens": int(trace.expert_ids.shape[0])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    a = _zoo.parse_seeded(ap, argv)
    runs = {v: _zoo.runs(v, a.steps, a.seeds) for v in VARIANTS}
    val = {v: _zoo.val_losses(rs) for v, rs in runs.items()}
    hits = {v: [cached(_zoo.RUNS, "pregate_hits", {"run": r["dir"], "seed": s, "prompts": a.prompts,
                                                     "new_tokens": a.new_tokens},
                       lambda r=r, s=s: decode_hit_rates(r["dir"], s, a.prompts, a.new_tokens))
                for s, r in zip(a.seeds, rs)] for v, rs in runs.items()}
    sizes = hits["top2"][0]["sizes"]
    at = sizes.index(2 * sizes[0])  # 2k slots
    hit_2k = {v: [h["lru_gate"][at] for h in hs] for v, hs in hits.items()}
    recall = {v: [float(np.mean([x for x in h["gate_recall"] if x is not None])) for h in hs] for v, hs in hits.items()}
    claims = [
        _zoo.claim("pre-gating keeps per-layer routing's validation loss", "pregate", val["pregate"],
                   "top2", val["top2"], higher_is_better=False, margin=MARGIN),
        _zoo.claim(f"pre-gating raises the decode hit rate (LRU, {sizes[at]} slots, gate prefetch)", "pregate",
                   hit_2k["pregate"], "top2", hit_2k["top2"], higher_is_better=True),
    ]
    _zoo.print_claims(claims)
    print("gate top-k recall (mean over MoE layers): "
          + ", ".join(f"{v} {np.mean(recall[v]):.3f}" for v in VARIANTS), flush=True)

    plt = _zoo.plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for v, color in zip(VARIANTS, ("#999", "#4c72b0")):
        for key, style in (("lru_gate", "-"), ("lru", ":")):
            curve = np.asarray([h[key] for h in hits[v]], float)
            axes[0].errorbar(sizes, curve.mean(0), yerr=curve.std(0, ddof=1), ls=style, color=color, capsize=2,
                             label=f"{v}, {'gate prefetch' if key == 'lru_gate' else 'no prefetch'}")
    axes[0].set(xlabel="expert slots per MoE layer", ylabel="decode hit rate (LRU)",
                title="expert cache on greedy decoding")
    axes[0].legend(fontsize=8)
    axes[1].bar(VARIANTS, [np.mean(val[v]) for v in VARIANTS], yerr=[np.std(val[v], ddof=1) for v in VARIANTS],
                capsize=4, color=["#999", "#4c72b0"])
    axes[1].set(ylabel="validation loss (± sd)", ylim=(min(min(x) for x in val.values()) - 0.05, None),
                title="quality")
    fig.suptitle(f"pre-gating (Read-ME) vs per-layer routing, tiny preset, {len(a.seeds)} seeds")
    payload = _zoo.payload("pregate", a.steps, a.seeds, claims, margin=MARGIN, prompts=a.prompts,
                           new_tokens=a.new_tokens, val_loss=val, hits=hits, hit_rate_2k=hit_2k, gate_recall=recall)
    payload["command"] += f" --prompts {a.prompts} --new-tokens {a.new_tokens}"
    _zoo.save("pregate", payload, fig)


if __name__ == "__main__":
    main()
