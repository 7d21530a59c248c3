"""Expert placement (EPLB, ExFlow, MoETuner) against the default layout, on routing traces.

Each source gives one routing trace per seed (0, 1, 2):

  zipf     synthetic, DeepSeek-R1-like: E = 8 n experts for n devices (8 per device, as DeepSeek-R1's
           256 experts on EP32), top-8, 8 MoE layers, 16,384 tokens; each layer's popularity is
           Zipf(1) over its experts in a random order of its own, and with probability 0.5 a
           token's first expert at the next layer follows from its first expert here (a fixed
           random map per layer: inter-layer affinity)
  trained  the routing of the embedded corpus's validation text (16,384 tokens) under a tiny
           MoE with DeepSeek-like routing (`_zoo` variant e64: 64 experts of width 64, top-8,
           4 MoE layers; 600 steps), one model per seed (or the runs of --runs)

The first half of a trace's tokens is the statistics a placement is made from; the second half
judges it: excess load, (max - mean) / mean of the token-slots each device receives, per layer
and per window of 1,024 tokens (a training step's worth), averaged (TensorRT-LLM's imbalance
ratio of the hottest EP rank); and cross-device traffic, the share of a token's
consecutive-layer expert pairs on different devices (ExFlow's context-coherent expert
parallelism), over the whole held-out half.

Placements (`jmoe.parallel.placement`): round_robin (the default layout), greedy (by load),
eplb (DeepSeek's EPLB, global policy, one redundant slot per device: 1/8 of the experts of the
zipf traces), eplb_norep (EPLB without redundant slots), exflow (affinity), moetuner (balanced
clusters, then affinity between them).

Claims, per source and device count (three seeds; an interval from the per-seed values):
EPLB's excess load <= 0.15 (TensorRT-LLM reports 0.109 for DeepSeek-R1 on EP32 with 1/8
redundant experts); ExFlow cuts cross-device traffic by >= 30% against round robin; MoETuner's
excess load below round robin's and its traffic below greedy's (balance and affinity at once).
Writes experiments/results/placement.{json,png}.

    python experiments/placement.py [--runs RUN RUN RUN]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402

from jmoe.evals.stats import summary  # noqa: E402
from jmoe.infer.trace import RoutingTrace, trace_from_routings  # noqa: E402
from jmoe.parallel.placement import PlacementStats, excess_load, place, traffic  # noqa: E402

METHODS = {  # name -> (placement method, redundant slots per device)
    "round_robin": ("round_robin", 0), "greedy": ("greedy", 0), "eplb_norep": ("eplb", 0), "eplb": ("eplb", 1),
    "exflow": ("exflow", 0), "moetuner": ("moetuner", 0),
}
TOKENS, WINDOW = 16384, 1024
DEVICES = {"zipf": (8, 16, 64), "trained": (8, 16, 64)}


def zipf_trace(num_experts: int, seed: int, layers: int = 8, k: int = 8, tokens: int = TOKENS,
               affinity: float = 0.5) -> RoutingTrace:
    """The synthetic trace of the module docstring."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_experts + 1)
    p /= p.sum()
    order = [rng.permutation(num_experts) for _ in range(layers)]  # popularity rank -> expert
    follow = [rng.permutation(num_experts) for _ in range(layers)]
    ids = np.zeros((tokens, layers, k), np.int64)
    for l in range(layers):
        # k distinct experts per token by Zipf popularity (Gumbel top-k = sampling without replacement)
        g = np.log(p)[None, :] - np.log(-np.log(rng.random((tokens, num_experts))))
        picked = order[l][np.argsort(-g, axis=1)[:, :k]]
        if l:
            lead = follow[l][ids[:, l - 1, 0]]
            take = rng.random(tokens) < affinity
            rest = np.where(picked == lead[:, None], -1, picked)  # the followed expert first, no repeat
            rest = np.stack([r[r >= 0][: k - 1] for r in rest])
            picked = np.where(take[:, None], np.concatenate([lead[:, None], rest], axis=1), picked)
        ids[:, l] = picked
    return trace_from_routings([ids[:, l] for l in range(layers)], [np.full((tokens, k), 1.0 / k)] * layers, None,
                               num_experts=num_experts, seq_ids=np.zeros(tokens, int))


def trained_trace(run_dir: str) -> RoutingTrace:
    """The routing of the validation text under a trained run."""
    from jmoe.infer.load import open_model
    from jmoe.infer.offload_commands import trace_text

    model = open_model(run_dir).load()
    ids = [int(x) for x in _zoo.corpus().val[:TOKENS]]
    return trace_text(model, ids, model.cfg.max_seq_len, batch_size=16)


def split(trace: RoutingTrace, start: int, stop: int) -> PlacementStats:
    return PlacementStats.from_trace(RoutingTrace(
        expert_ids=trace.expert_ids[start:stop], weights=trace.weights[start:stop], num_experts=trace.num_experts,
        seq_ids=trace.seq_ids[start:stop], layers=trace.layers))


def judge(trace: RoutingTrace, n: int) -> dict:
    """{method: {"excess_load", "traffic", "seconds", "slots_per_device"}} for n devices."""
    half = trace.num_tokens // 2
    fit, held = split(trace, 0, half), split(trace, half, trace.num_tokens)
    windows = [split(trace, s, s + WINDOW).load for s in range(half, trace.num_tokens - WINDOW + 1, WINDOW)]
    out = {}
    for name, (method, per_device) in METHODS.items():
        t0 = time.perf_counter()
        pl = place(fit, method, n, fit.num_experts + per_device * n)
        seconds = time.perf_counter() - t0
        out[name] = {"excess_load": float(np.mean([excess_load(pl, w).mean() for w in windows])),
                     "traffic": traffic(pl, held.pairs), "seconds": seconds, "slots_per_device": pl.slots_per_device,
                     "redundant_share": per_device * n / fit.num_experts}
    return out


def claims_of(results: dict) -> list[dict]:
    out = []
    for source, by_n in results.items():
        for n, per_seed in by_n.items():
            values = lambda m, f: [s[m][f] for s in per_seed]  # noqa: E731
            where = f"{source}, {n} devices"
            share = per_seed[0]["eplb"]["redundant_share"]
            s = summary(values("eplb", "excess_load"))
            out.append({"claim": f"{where}: EPLB ({share:.1%} redundant) excess load <= 0.15", "a": "eplb",
                        "a_summary": s, "verdict": _zoo.goal_verdict(s, 0.15, higher_is_better=False)})
            cut = [1 - a / b for a, b in zip(values("exflow", "traffic"), values("round_robin", "traffic"))]
            s = summary(cut)
            out.append({"claim": f"{where}: ExFlow cuts cross-device traffic by >= 30% against round robin",
                        "a": "exflow", "a_summary": s, "verdict": _zoo.goal_verdict(s, 0.30, higher_is_better=True)})
            out.append(_zoo.claim(f"{where}: MoETuner's excess load below round robin's", "moetuner",
                                  values("moetuner", "excess_load"), "round_robin", values("round_robin", "excess_load"),
                                  higher_is_better=False))
            out.append(_zoo.claim(f"{where}: MoETuner's cross-device traffic below greedy's", "moetuner",
                                  values("moetuner", "traffic"), "greedy", values("greedy", "traffic"),
                                  higher_is_better=False))
    return out


def plot(results: dict):
    plt = _zoo.plt()
    cases = [(source, n) for source, by_n in results.items() for n in by_n]
    fig, axes = plt.subplots(1, len(cases), figsize=(3.3 * len(cases), 3.4), squeeze=False)
    for ax, (source, n) in zip(axes[0], cases):
        per_seed = results[source][n]
        for name in METHODS:
            x = [s[name]["traffic"] for s in per_seed]
            y = [s[name]["excess_load"] for s in per_seed]
            ax.errorbar(np.mean(x), np.mean(y), xerr=np.std(x), yerr=np.std(y), marker="o", capsize=2, label=name)
        ax.set(title=f"{source}, {n} devices", xlabel="cross-device traffic")
        ax.set_yscale("symlog", linthresh=0.1)
    axes[0][0].set_ylabel("excess load (max - mean) / mean")
    axes[0][-1].legend(fontsize=7)
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(_zoo.SEEDS))
    ap.add_argument("--sources", nargs="+", choices=list(DEVICES), default=list(DEVICES), help="trace sources")
    ap.add_argument("--runs", nargs="+", metavar="RUN", help="trained runs to trace, one per seed (default: train "
                    "the zoo's e64 variant)")
    ap.add_argument("--steps", type=int, default=600, help="training steps of the traced models")
    a = _zoo.parse_seeded(ap, argv)
    if a.runs and len(a.runs) != len(a.seeds):
        ap.error(f"--runs names {len(a.runs)} runs for {len(a.seeds)} seeds")
    results = {source: {} for source in a.sources}
    dirs = []
    if "trained" in a.sources:
        dirs = a.runs or [r["dir"] for r in _zoo.runs("e64", a.steps, a.seeds)]
        traces = {"trained": [trained_trace(d) for d in dirs]}
    for source in a.sources:
        for n in DEVICES[source]:
            results[source][n] = []
            for i, s in enumerate(a.seeds):
                trace = zipf_trace(8 * n, s) if source == "zipf" else traces["trained"][i]
                results[source][n].append(judge(trace, n))
                print(f"{source}, {n} devices, seed {s}: " + ", ".join(
                    f"{m} {v['excess_load']:.3f}/{v['traffic']:.3f}" for m, v in results[source][n][-1].items()),
                    flush=True)
    claims = claims_of(results)
    _zoo.print_claims([c for c in claims if "difference" in c])
    for c in claims:
        if "difference" not in c:
            print(f"{c['claim']}: {_zoo.fmt_ci(c['a_summary'])} -> {c['verdict']}")
    payload = _zoo.payload("placement", a.steps, a.seeds, claims, results={k: {str(n): v for n, v in by_n.items()}
                                                                             for k, by_n in results.items()},
                           methods={k: list(v) for k, v in METHODS.items()}, tokens=TOKENS, window=WINDOW,
                           trained_runs=[str(d) for d in dirs], sources=a.sources)
    if a.sources != list(DEVICES):
        payload["command"] += " --sources " + " ".join(a.sources)
    _zoo.save("placement", payload, plot(results))


if __name__ == "__main__":
    main()
