"""Expert offloading on a trained model: cache hit rates, next-layer prediction, decode speed.

Recipe, per seed (default seeds 0 1 2), every stage cached in
experiments/results/offload_runs/ by its configuration and the hash of jmoe's sources:
  model    `jmoe train --preset small --steps STEPS --batch-size BATCH --seed SEED` (E=16,
           k=2, 6 MoE layers; --steps 300 and --batch-size 16 by default, against the preset's
           3000 steps of 32 sequences, so that three seeds train on 2 CPU cores in about an
           hour; resumable, it continues an interrupted run)
  traces   decode trace: greedy generation of --new-tokens tokens from --prompts prompts
           (64-byte slices of the validation split), recorded by the engine; teacher-forced
           traces of the training split (to train the learned predictor) and of the
           validation split (to judge it)
  caches   hit rate against cache size (k .. E slots per layer) for lru, lfu, score, arc
           and belady on the decode trace, without prefetch and with the gate's prefetch
  predict  top-k recall per MoE layer: the cross-layer gate at lookahead 1, 2, 3 and the
           learned predictor (lookahead 1) on the validation split
  speed    decode tokens/s at batch 1 of the all-resident engine, of offloaded experts
           with a cache of 2k slots per layer (lru, gate prefetch) and of load on demand
           (no cache), each timed --repeats times interleaved after a warm-up; the memory
           each holds on the device, the bytes it moves per token, and the time model:
           seconds per token if those bytes crossed a PCIe 4.0 x16 link or an H200's host
           link, serially (load on demand) or overlapped with compute (prefetch)

Goals (issue): the best online policy within 5 points of Belady at a cache of 2x the active
experts; next-layer prediction top-k recall >= 90%; offloaded decode >= 2x load on demand.
Each is judged from the per-seed values: mean, standard deviation and a 95% t-interval
(of the difference where there is one); "reproduced" only when the interval clears the
goal (`jmoe.evals.stats`). Stages are cached by configuration and code version
(experiments/_harness.py). Writes experiments/results/offload.json and offload.png.

With --gpu (one NVIDIA H100/H200): a Mixtral-shaped model (d=4096, f=14336, E=8, k=2, bf16,
random weights; --gpu-layers layers, 12 by default: 34 GB of experts) whose experts live in
pinned host memory, with a device budget of --gpu-cache expert slots per layer (4 of 8: half
the experts); decode tokens/s at batch 1 of offloaded experts (lru, gate prefetch) against
load on demand (k slots, no cache), each timed --repeats times interleaved, with the hit rate
and bytes moved per token; writes experiments/results/offload_gpu.json. `--gpu --quick` runs
the same code at tiny size (on a CPU both tiers are host memory).

    python experiments/offload.py                    # everything (resumes cached stages)
    python experiments/offload.py --seeds 0          # one seed
    python experiments/offload.py --quick            # a few steps, checks the script
    python experiments/offload.py --gpu              # one H100/H200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import cached as _cached, code_version, config_key  # noqa: E402

from jmoe.evals.stats import goal_verdict, summary as t_interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
RUNS = RESULTS / "offload_runs"
POLICIES = ("lru", "lfu", "score", "arc", "belady")
ONLINE = ("lru", "lfu", "score", "arc")


def train_model(seed: int, steps: int, batch_size: int) -> Path:
    """The checkpoint recipe: jmoe train --preset small --steps STEPS --batch-size BATCH --seed SEED
    (resumable)."""
    out = RUNS / f"small-steps{steps}-batch{batch_size}-seed{seed}"
    if (out / "summary.json").exists():
        return out
    cmd = [sys.executable, "-m", "jmoe.cli", "train", "--preset", "small", "--steps", str(steps), "--batch-size",
           str(batch_size), "--seed", str(seed), "--ckpt-every", "50", "--out", str(out), "--quiet"]
    if (out / "checkpoints").exists():
        cmd.append("--resume")
    print("   " + " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def one_seed(seed: int, args) -> dict:
    import jax

    from jmoe.data import load_corpus
    from jmoe.infer import Engine, load
    from jmoe.infer.cachesim import hit_rate_curve
    from jmoe.infer.offload import LINKS, OffloadedEngine, time_model
    from jmoe.infer.offload_commands import trace_text
    from jmoe.infer.predict import LearnedPredictor, gate_accuracy, gate_prefetch
    from jmoe.infer.trace import RoutingTrace, recorder_for

    print(f"== seed {seed}", flush=True)
    run = train_model(seed, args.steps, args.batch_size)
    model = load(run)
    cfg = model.cfg
    corpus = load_corpus(None)
    k = cfg.moe_for(cfg.moe_layers[0]).top_k
    E = cfg.moe_for(cfg.moe_layers[0]).num_experts
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, corpus.val.size - 64, args.prompts)
    prompts = [corpus.val[s: s + 64].tolist() for s in starts]
    conf = {"seed": seed, "steps": args.steps, "batch_size": args.batch_size, "prompts": args.prompts,
            "new_tokens": args.new_tokens}
    trace_dir = RUNS / f"traces-{config_key(conf)}"
    trace_dir.mkdir(parents=True, exist_ok=True)

    def decode_trace() -> RoutingTrace:
        path = trace_dir / "decode.npz"
        if not path.exists():
            rec = recorder_for(cfg)
            Engine(cfg, model.params, model.state, batch_size=1).generate(prompts, max_new_tokens=args.new_tokens,
                                                                          recorder=rec)
            rec.trace().save(path)
        return RoutingTrace.load(path)

    def text_trace(split: str, n_tokens: int) -> RoutingTrace:
        path = trace_dir / f"{split}.npz"
        if not path.exists():
            data = getattr(corpus, split)
            start = int(rng.integers(0, data.size - n_tokens))
            trace_text(model, data[start: start + n_tokens].tolist(), cfg.max_seq_len, 8).save(path)
        return RoutingTrace.load(path)

    dec = decode_trace()
    decode_only = dec  # prompts and generated tokens, in processing order (batch 1)
    sizes = list(range(k, E + 1))

    def caches():
        plain = hit_rate_curve(decode_only, sizes, POLICIES)
        gate = hit_rate_curve(decode_only, sizes, ONLINE, prefetch=gate_prefetch(decode_only))
        return {"sizes": sizes, "hit_rate": plain["hit_rate"], "hit_rate_gate_prefetch": gate["hit_rate"]}

    cache_res = _cached(RUNS, f"caches-s{seed}", conf, caches)

    def predict():
        train_t = text_trace("train", args.predictor_tokens)
        val_t = text_trace("val", args.eval_tokens)
        pred = LearnedPredictor.fit(train_t)
        val_ids = corpus.val[: (args.eval_tokens // cfg.max_seq_len) * cfg.max_seq_len]
        tokens = np.asarray(val_ids, np.int32).reshape(-1, cfg.max_seq_len)
        gate = {}
        for lo in range(0, tokens.shape[0], 8):
            part = gate_accuracy(cfg, model.params, model.state, tokens[lo: lo + 8], lookaheads=(1, 2, 3))
            for n, accs in part.items():
                gate.setdefault(str(n), []).append(accs)
        gate = {n: [None if v[0] is None else float(np.mean(v)) for v in zip(*rows)] for n, rows in gate.items()}
        return {"gate": gate, "learned": pred.accuracy(val_t), "learned_on_decode": pred.accuracy(dec)}

    pred_res = _cached(RUNS, f"predict-s{seed}", {**conf, "ptok": args.predictor_tokens, "etok": args.eval_tokens}, predict)

    def speed():
        size = min(2 * k, E)
        engines = {
            "resident": Engine(cfg, model.params, model.state, batch_size=1),
            "offloaded": OffloadedEngine(cfg, model.params, model.state, batch_size=1, cache_size=size, policy="lru",
                                         prefetch="gate"),
            "on_demand": OffloadedEngine(cfg, model.params, model.state, batch_size=1, cache_size=k, policy="none",
                                         prefetch="none"),
        }
        prompt = prompts[:1]
        for eng in engines.values():  # warm-up: compile
            eng.generate(prompt, max_new_tokens=4)
        rates = {name: [] for name in engines}
        stats = {}
        for _ in range(args.repeats):
            for name, eng in engines.items():
                if name != "resident":
                    eng.lm.reset_cache()
                _, st = eng.generate(prompt, max_new_tokens=args.speed_tokens)
                rates[name].append(st.decode_tokens_per_s)
                if name != "resident":
                    stats[name] = eng.offload_stats.to_dict()
        full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
        memory = {"resident": full, **{n: engines[n].lm.resident_bytes for n in ("offloaded", "on_demand")}}
        med = {n: float(np.median(r)) for n, r in rates.items()}
        compute_s = 1.0 / med["resident"]
        model_t = {}
        for link, bw in LINKS.items():
            od = time_model(engines["on_demand"].offload_stats, compute_s, bw)
            off = time_model(engines["offloaded"].offload_stats, compute_s, bw)
            model_t[link] = {"on_demand_s_per_token": od["serial_s_per_token"],
                             "offloaded_s_per_token": off["overlapped_s_per_token"],
                             "offloaded_serial_s_per_token": off["serial_s_per_token"],
                             "speedup_overlapped": od["serial_s_per_token"] / off["overlapped_s_per_token"],
                             "speedup_serial": od["serial_s_per_token"] / off["serial_s_per_token"]}
        return {"cache_size": size, "tokens_per_s": rates, "median_tokens_per_s": med, "offload": stats,
                "device_bytes": memory, "time_model": model_t,
                "speedup_vs_on_demand": med["offloaded"] / med["on_demand"]}

    speed_res = _cached(RUNS, f"speed-s{seed}", {**conf, "repeats": args.repeats, "st": args.speed_tokens}, speed)
    return {"seed": seed, "run": str(run.relative_to(ROOT)), "top_k": k, "num_experts": E,
            "moe_layers": len(cfg.moe_layers), "decode_trace_tokens": dec.num_tokens, "caches": cache_res,
            "predict": pred_res, "speed": speed_res}


def summarize(per_seed: list[dict]) -> dict:
    k = per_seed[0]["top_k"]
    i2k = per_seed[0]["caches"]["sizes"].index(min(2 * k, per_seed[0]["num_experts"]))
    best_online, gap = [], []
    for r in per_seed:
        hr = r["caches"]["hit_rate"]
        best = max(hr[p][i2k] for p in ONLINE)
        best_online.append(best)
        gap.append(100 * (hr["belady"][i2k] - best))
    nxt = [float(np.mean([a for a in r["predict"]["gate"]["1"] if a is not None])) for r in per_seed]
    learned = [float(np.mean([a for a in r["predict"]["learned"] if a is not None])) for r in per_seed]
    speedup = [r["speed"]["speedup_vs_on_demand"] for r in per_seed]
    g_gap, g_gate, g_learned, g_speed = t_interval(gap), t_interval(nxt), t_interval(learned), t_interval(speedup)
    best_pred = g_gate if g_gate["mean"] >= g_learned["mean"] else g_learned
    lru = [r["caches"]["hit_rate"]["lru"][i2k] for r in per_seed]
    lru_gate = [r["caches"]["hit_rate_gate_prefetch"]["lru"][i2k] for r in per_seed]
    speeds = {n: t_interval([r["speed"]["median_tokens_per_s"][n] for r in per_seed])
              for n in per_seed[0]["speed"]["median_tokens_per_s"]}
    links = {link: t_interval([r["speed"]["time_model"][link]["speedup_overlapped"] for r in per_seed])
             for link in per_seed[0]["speed"]["time_model"]}
    return {
        "lru_hit_rate_at_2k": t_interval(lru),
        "lru_gate_prefetch_hit_rate_at_2k": t_interval(lru_gate),
        "gate_prefetch_gain_points_at_2k": t_interval(100 * (np.asarray(lru_gate) - np.asarray(lru))),
        "decode_tokens_per_s": speeds,
        "device_bytes": per_seed[0]["speed"]["device_bytes"],
        "time_model_offloaded_over_on_demand": links,
        "belady_minus_best_online_points_at_2k": {**g_gap, "goal": "<= 5", "verdict": goal_verdict(g_gap, 5.0, higher_is_better=False)},
        "best_online_hit_rate_at_2k": t_interval(best_online),
        "next_layer_recall_gate": {**g_gate, "goal": ">= 0.90", "verdict": goal_verdict(g_gate, 0.90)},
        "next_layer_recall_learned": {**g_learned, "goal": ">= 0.90", "verdict": goal_verdict(g_learned, 0.90)},
        "next_layer_recall_best": {"predictor": "gate" if best_pred is g_gate else "learned",
                                   "verdict": goal_verdict(best_pred, 0.90)},
        "offloaded_over_on_demand": {**g_speed, "goal": ">= 2", "verdict": goal_verdict(g_speed, 2.0)},
    }


def _mean_over_seeds(a: np.ndarray) -> np.ndarray:
    """Column means over the finite entries (NaN where a layer has none, e.g. the first MoE
    layer, which no earlier layer predicts)."""
    finite = np.isfinite(a)
    n = finite.sum(0)
    return np.where(n > 0, np.where(finite, a, 0.0).sum(0) / np.maximum(n, 1), np.nan)


def plot(per_seed: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sizes = per_seed[0]["caches"]["sizes"]
    for p in POLICIES:
        hr = np.array([r["caches"]["hit_rate"][p] for r in per_seed], float)
        axes[0].errorbar(sizes, hr.mean(0), yerr=hr.std(0), label=p, marker="o", ms=3, capsize=2)
    hr = np.array([r["caches"]["hit_rate_gate_prefetch"]["lru"] for r in per_seed], float)
    axes[0].errorbar(sizes, hr.mean(0), yerr=hr.std(0), label="lru + gate prefetch", ls="--", capsize=2)
    axes[0].axvline(2 * per_seed[0]["top_k"], color="gray", lw=0.8, ls=":")
    axes[0].set(xlabel="expert slots per MoE layer", ylabel="hit rate", title="decode trace: hit rate vs cache size")
    axes[0].legend(fontsize=8)
    L = per_seed[0]["moe_layers"]
    for n in ("1", "2", "3"):
        acc = np.array([[np.nan if a is None else a for a in r["predict"]["gate"][n]] for r in per_seed], float)
        axes[1].plot(range(L), _mean_over_seeds(acc), marker="o", label=f"gate, lookahead {n}")
    acc = np.array([[np.nan if a is None else a for a in r["predict"]["learned"]] for r in per_seed], float)
    axes[1].plot(range(L), _mean_over_seeds(acc), marker="s", ls="--", label="learned, lookahead 1")
    axes[1].axhline(0.9, color="gray", lw=0.8, ls=":")
    axes[1].set(xlabel="MoE layer", ylabel="top-k recall", title="predicting a layer's experts", ylim=(0, 1.02))
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    tmp.replace(path)
    plt.close(fig)


def gpu_model(n_layers: int, quick: bool, seed: int = 0):
    """(cfg, params) of a Mixtral-shaped model with random bf16 weights: the resident parts on
    the device and the routed experts as NumPy arrays in host memory, built one layer at a time
    (the device never holds every expert)."""
    import jax

    from jmoe.config import MoEConfig
    from jmoe.nn import init_lm
    from jmoe.nn.transformer import LMConfig

    d, f, V, H, Hkv = (64, 128, 256, 4, 2) if quick else (4096, 14336, 32000, 32, 8)
    moe = MoEConfig(d_model=d, num_experts=8, top_k=2, d_ff=f, router="topk", router_options=dict(renormalize=True),
                    dtype="bfloat16", param_dtype="bfloat16")
    cfg = LMConfig(vocab_size=V, d_model=d, n_layers=n_layers, n_heads=H, n_kv_heads=Hkv, d_ff=f, moe=moe,
                   max_seq_len=4096, rope_theta=1e6, norm_eps=1e-5).replace(param_dtype="bfloat16", dtype="bfloat16")
    one = cfg.replace(n_layers=1)
    params = None
    for i in range(n_layers):
        p = init_lm(jax.random.fold_in(jax.random.key(seed), i), one)
        layer = p["layers"]["0"]
        layer["moe"] = {**layer["moe"], "experts": jax.tree.map(np.asarray, layer["moe"]["experts"])}
        if params is None:
            params = {k: v for k, v in p.items() if k != "layers"}
            params["layers"] = {}
        params["layers"][str(i)] = layer
        del p
    return cfg, params


def run_gpu(args) -> dict:
    import jax

    from jmoe.infer.offload import OffloadedEngine, format_bytes

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}", flush=True)
    t0 = time.perf_counter()
    cfg, params = gpu_model(args.gpu_layers, args.quick)
    k, E = cfg.moe.top_k, cfg.moe.num_experts
    expert_bytes = sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize
                       for a in jax.tree.leaves(params["layers"]["0"]["moe"]["experts"]))
    print(f"{cfg.n_layers} layers, {format_bytes(expert_bytes)} per expert, "
          f"{format_bytes(expert_bytes * E * cfg.n_layers)} of experts; built in {time.perf_counter() - t0:.0f} s",
          flush=True)
    engines = {
        "offloaded": OffloadedEngine(cfg, params, None, batch_size=1, cache_size=args.gpu_cache, policy="lru",
                                     prefetch="gate"),
        "on_demand": OffloadedEngine(cfg, params, None, batch_size=1, cache_size=k, policy="none", prefetch="none"),
    }
    del params
    rng = np.random.default_rng(0)
    prompt = [rng.integers(0, cfg.vocab_size, args.gpu_prompt_tokens).tolist()]
    for eng in engines.values():  # warm-up: compile every piece a decoding step uses
        eng.generate(prompt, max_new_tokens=8)
    rates = {n: [] for n in engines}
    stats = {}
    for _ in range(args.repeats):
        for name, eng in engines.items():
            eng.lm.reset_cache()
            _, st = eng.generate(prompt, max_new_tokens=args.speed_tokens)
            rates[name].append(st.decode_tokens_per_s)
            stats[name] = eng.offload_stats.to_dict()
            print(f"  {name}: {st.decode_tokens_per_s:.2f} tok/s, decode hit rate "
                  f"{eng.offload_stats.decode_hit_rate:.3f}", flush=True)
    med = {n: float(np.median(r)) for n, r in rates.items()}
    return {"device": dev.device_kind, "platform": dev.platform, "layers": cfg.n_layers, "expert_bytes": expert_bytes,
            "experts_total_bytes": expert_bytes * E * cfg.n_layers, "cache_size": args.gpu_cache,
            "device_bytes": {n: e.lm.resident_bytes for n, e in engines.items()},
            "tokens_per_s": rates, "median_tokens_per_s": med, "seconds_per_token": {n: 1 / v for n, v in med.items()},
            "offload": stats, "speedup_vs_on_demand": med["offloaded"] / med["on_demand"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300, help="training steps of the small preset (default 300)")
    ap.add_argument("--batch-size", type=int, default=16, help="training sequences per step (default 16)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--predictor-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--speed-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script")
    ap.add_argument("--gpu", action="store_true", help="a Mixtral-shaped model offloaded on one GPU")
    ap.add_argument("--gpu-layers", type=int, default=12)
    ap.add_argument("--gpu-cache", type=int, default=4, help="expert slots per layer on the device (of 8)")
    ap.add_argument("--gpu-prompt-tokens", type=int, default=128)
    args = ap.parse_args(argv)
    command = "python experiments/offload.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.gpu:
        if args.quick:
            args.gpu_layers, args.gpu_prompt_tokens, args.speed_tokens, args.repeats = 2, 16, 4, 1
        result = {"command": command, **run_gpu(args)}
        print(json.dumps({k: result[k] for k in ("median_tokens_per_s", "speedup_vs_on_demand", "device_bytes")}))
        out = RESULTS / ("offload_gpu_quick.json" if args.quick else "offload_gpu.json")
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
        return 0
    if args.quick:
        args.steps, args.prompts, args.new_tokens = 4, 2, 8
        args.predictor_tokens = args.eval_tokens = 512
        args.speed_tokens, args.repeats = 4, 1
    per_seed = [one_seed(s, args) for s in args.seeds]
    result = {"command": command, "sources_sha256": code_version(), "config": vars(args), "per_seed": per_seed,
              "summary": summarize(per_seed) if len(per_seed) > 1 else None}
    out = RESULTS / ("offload_quick.json" if args.quick else "offload.json")
    out.write_text(json.dumps(result, indent=1))
    plot(per_seed, out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1) if result["summary"] else "one seed: no summary")
    for r in per_seed:
        s = r["speed"]
        print(f"seed {r['seed']}: decode tok/s resident {s['median_tokens_per_s']['resident']:.1f}, offloaded "
              f"{s['median_tokens_per_s']['offloaded']:.1f}, on demand {s['median_tokens_per_s']['on_demand']:.1f}; "
              f"speedup {s['speedup_vs_on_demand']:.2f}x")
    print(f"wrote {out}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
