"""Smaller, faster experts: quantization (uniform widths and MC-MoE's mixed widths), online
expert skipping and PreMoe's task-specific experts, on a model trained on the evaluation suite.

For each seed, trains the preset (default `small`) on the equal-weight mixture of every task of
`jmoe.evals`, then:
  - quantizes its experts (`jmoe.quant.quantize_run`): HQQ at 8/4/3/2 bits, GPTQ at 4/3/2 bits
    and MC-MoE at 2, 2.5 and 3 bits on average, and scores each on validation loss and every
    task (`jmoe.evals.evaluate`, test split), with the exact bytes;
  - sweeps online expert skipping (`skip_ratio`) on the float model: skip rate against loss;
  - stores PreMoe statistics with half and a quarter of the experts per layer and scores each
    task with its own subset and with the subset retrieved from the task's prompts;
  - times greedy decoding (batch 1) of the float and the 4-bit model side by side.

Claims (paired by seed): 4-bit experts within the seed noise of the float model; MC-MoE better
than uniform GPTQ at the same average width (2 and 3 bits); online skipping of >= 15% of the
expert slots within the noise; PreMoe with half the experts keeping >= 95% of every task's
metric; 4-bit decoding faster than float. Quantized runs are cached under
experiments/results/quant_runs by source run, method and code version. Writes
experiments/results/quantize_<preset>.{json,png}.

    python experiments/quantize.py [--preset small] [--steps N] [--seeds 0 1 2]
    python experiments/quantize.py --seeds 1 --results-only    # a slice: one seed's measurements
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _zoo  # noqa: E402
from _harness import code_version, config_key  # noqa: E402

from jmoe import evals  # noqa: E402
from jmoe.evals.mixture import mix_spec  # noqa: E402
from jmoe.evals.stats import summary  # noqa: E402
from jmoe.infer.load import open_model, select_experts  # noqa: E402
from jmoe.merge.experts.premoe import premoe_run, query_sequences  # noqa: E402
from jmoe.nn import preset  # noqa: E402
from jmoe.quant.run import quantize_run  # noqa: E402
from jmoe.train import TrainConfig  # noqa: E402

QUANT = {  # variant -> quantize_run arguments
    "hqq8": dict(method="hqq", bits=8), "hqq4": dict(method="hqq", bits=4), "hqq3": dict(method="hqq", bits=3),
    "hqq2": dict(method="hqq", bits=2), "gptq4": dict(method="gptq", bits=4), "gptq3": dict(method="gptq", bits=3),
    "gptq2": dict(method="gptq", bits=2), "mcmoe2": dict(method="mcmoe", avg_bits=2.0),
    "mcmoe2.5": dict(method="mcmoe", avg_bits=2.5), "mcmoe3": dict(method="mcmoe", avg_bits=3.0),
}
SKIP_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
GROUP_SIZE = 64
QUANT_VERSION = code_version()  # jmoe.quant and jmoe.merge.experts.premoe are imported above
QUANT_RUNS = _zoo.RESULTS / "quant_runs"


def trained(name: str, steps: int | None, seed: int, data: str) -> dict:
    p = preset(name)
    tc = TrainConfig(**{**p["train"], **({"steps": steps} if steps else {}), "seed": seed})
    return _zoo.run(f"quant_{name}", p["model"], tc, data)


def derived(source: dict, variant: str, config: dict, make) -> Path:
    """The run `make(out)` writes from `source`, cached by source, variant and code version."""
    key = config_key([Path(source["dir"]).name, variant, config], QUANT_VERSION)[:10]
    out = QUANT_RUNS / f"{Path(source['dir']).name}-{variant}-{key}"
    if not (out / "report.json").exists():
        print(f"== {variant} of {Path(source['dir']).name}", flush=True)
        make(out)
    return out


def scores_of(model, tasks, a) -> dict:
    res = evals.evaluate(model, tasks, examples=a.examples, max_windows=a.windows, split="test", seed=0)
    return {r.task: r.value for r in res}


def decode_speed(model, prompt_ids, new_tokens: int) -> float:
    from jmoe.infer.sampling import SamplingParams

    engine = model.engine(1)
    engine.generate([prompt_ids], max_new_tokens=4, sampling=SamplingParams(temperature=0.0))  # compile
    _, stats = engine.generate([prompt_ids], max_new_tokens=new_tokens, sampling=SamplingParams(temperature=0.0),
                               stop_ids=())
    return stats.decode_tokens_per_s


def one_seed(result: dict, tasks, a) -> dict:
    src = result["dir"]
    out = {"seed": result["seed"], "source": src, "variants": {}, "skip": [], "premoe": {}}
    float_model = open_model(src).load()
    from jmoe.data import eval_batches
    from jmoe.train.trainer import evaluate

    cfg = float_model.cfg
    tc = TrainConfig.from_dict(json.loads((Path(src) / "config.json").read_text())["train"])
    val = eval_batches(_zoo.corpus(result["data"]).val, tc.eval_batches, tc.batch_size, tc.seq_len)
    base = evaluate(float_model.params, float_model.state or None, cfg, val)
    out["float"] = {"val_loss": base["val_loss"], "scores": scores_of(float_model, tasks, a)}
    print(f"   float: val {base['val_loss']:.4f} " + ", ".join(f"{k} {v:.3f}" for k, v in out["float"]["scores"].items()),
          flush=True)
    for variant in a.variants:
        kw = QUANT[variant]
        config = {**kw, "group_size": GROUP_SIZE, "calib_batches": a.calib_batches}
        run = derived(result, variant, config, lambda o, kw=kw: quantize_run(
            src, o, group_size=GROUP_SIZE, calib_batches=a.calib_batches,
            log=lambda m: None, **kw))
        report = json.loads((run / "report.json").read_text())
        scores = scores_of(open_model(run).load(), tasks, a)
        out["variants"][variant] = {
            "val_loss": report["val_loss_after"], "avg_bits": report["avg_bits"],
            "bits_per_weight": report["expert_bits_per_weight"], "expert_bytes": report["expert_bytes_after"],
            "expert_bytes_float": report["expert_bytes_before"], "scores": scores, "dir": str(run)}
        print(f"   {variant}: val {report['val_loss_after']:.4f}, {report['expert_bits_per_weight']:.2f} bits/weight",
              flush=True)
    for r in SKIP_RATIOS:
        ev = evaluate(float_model.params, float_model.state or None, cfg.with_moe(skip_ratio=r), val)
        out["skip"].append({"ratio": r, "val_loss": ev["val_loss"], "skip_rate": ev.get("skip_rate", 0.0)})
    print("   skipping: " + ", ".join(f"{s['ratio']}: {s['skip_rate']:.1%} -> {s['val_loss']:.4f}" for s in out["skip"]),
          flush=True)
    E = min(cfg.moe_for(i).num_experts for i in cfg.moe_layers)
    k = max(cfg.moe_for(i).top_k for i in cfg.moe_layers)
    names = ",".join(t.name for t in tasks)
    for label, m in (("half", E // 2), ("quarter", max(E // 4, k))):
        config = {"experts_per_layer": m, "tasks": names, "examples": a.premoe_examples}
        run = derived(result, f"premoe_{label}", config, lambda o, m=m: premoe_run(
            src, o, experts_per_layer=m, tasks=names, examples=a.premoe_examples, log=lambda msg: None))
        source = open_model(run)
        model = source.load()
        oracle, retrieved, hits = {}, {}, {}
        for t in tasks:
            chosen, _ = select_experts(model, source.task_experts, t.name)
            oracle[t.name] = scores_of(chosen, [t], a)[t.name]
            prompts = query_sequences(t, model.tokenizer, "test", seed=0, max_len=cfg.max_seq_len)
            picked, task = select_experts(model, source.task_experts, "auto", prompts)
            hits[t.name] = task == t.name
            retrieved[t.name] = oracle[t.name] if task == t.name else scores_of(picked, [t], a)[t.name]
        out["premoe"][label] = {"experts_per_layer": m, "oracle": oracle, "retrieved": retrieved, "retrieval_hits": hits}
        print(f"   premoe {label} ({m} experts): " + ", ".join(f"{n} {v:.3f}" for n, v in oracle.items()), flush=True)
    prompt = float_model.tokenizer.encode("def ")
    q4 = open_model(out["variants"]["hqq4"]["dir"]).load()
    speeds = {"float": [], "hqq4": []}
    for _ in range(3):  # alternating, side by side
        speeds["float"].append(decode_speed(float_model, prompt, a.decode_tokens))
        speeds["hqq4"].append(decode_speed(q4, prompt, a.decode_tokens))
    out["decode_tokens_per_s"] = {k: float(np.median(v)) for k, v in speeds.items()}
    out["decode_speedup"] = out["decode_tokens_per_s"]["hqq4"] / out["decode_tokens_per_s"]["float"]
    print(f"   decode: float {out['decode_tokens_per_s']['float']:.1f} tok/s, 4-bit "
          f"{out['decode_tokens_per_s']['hqq4']:.1f} tok/s ({out['decode_speedup']:.2f}x)", flush=True)
    return out


def seed_results(result: dict, tasks, a) -> dict:
    """`one_seed`, cached in quant_runs by source run, settings and code version (a long run
    continues where it stopped)."""
    settings = {k: getattr(a, k) for k in ("examples", "windows", "calib_batches", "premoe_examples", "decode_tokens",
                                           "variants")}
    settings["tasks"] = [t.name for t in tasks]
    key = config_key([Path(result["dir"]).name, settings, list(SKIP_RATIOS)], QUANT_VERSION)[:10]
    path = QUANT_RUNS / f"{Path(result['dir']).name}-results-{key}.json"
    if path.exists():
        print(f"== reusing the results of {Path(result['dir']).name}", flush=True)
        return json.loads(path.read_text())
    out = one_seed(result, tasks, a)
    QUANT_RUNS.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    return out


def task_ratio(kind: str, value: float, base: float) -> float | None:
    """A task's metric as a share of the float model's (bits per byte: lower is better); None
    when the float model scores 0 (nothing to keep)."""
    if kind == "exact_match":
        return value / base if base > 0 else None
    return base / value


def claims_of(per_seed: list[dict], tasks) -> list[dict]:
    val = lambda v: [s["variants"][v]["val_loss"] for s in per_seed]  # noqa: E731
    have = set(per_seed[0]["variants"])
    floats = [s["float"]["val_loss"] for s in per_seed]
    out = [_zoo.claim("4-bit experts (HQQ): validation loss vs float", "hqq4", val("hqq4"), "float", floats,
                      higher_is_better=False)]
    for bits in ("2", "3"):
        if not {f"mcmoe{bits}", f"gptq{bits}"} <= have:
            continue
        out.append(_zoo.claim(f"MC-MoE beats uniform GPTQ at {bits} bits on average: validation loss", f"mcmoe{bits}",
                              val(f"mcmoe{bits}"), f"gptq{bits}", val(f"gptq{bits}"), higher_is_better=False))
    # the least skipping ratio that skips >= 15% of the slots on every seed
    for i, r in enumerate(SKIP_RATIOS):
        rates = [s["skip"][i]["skip_rate"] for s in per_seed]
        if min(rates) >= 0.15:
            out.append(_zoo.claim(f"online skipping at ratio {r} (skips {np.mean(rates):.1%}): validation loss vs "
                                  "float", f"skip{r}", [s["skip"][i]["val_loss"] for s in per_seed], "float",
                                  [s["skip"][0]["val_loss"] for s in per_seed], higher_is_better=False))
            break
    for label in ("half", "quarter"):
        for t in tasks:
            ratios = [task_ratio(t.kind, s["premoe"][label]["oracle"][t.name], s["float"]["scores"][t.name])
                      for s in per_seed]
            text = f"PreMoe, {label} of the experts: {t.name} keeps >= 95% of the float metric"
            if any(r is None for r in ratios):
                out.append({"claim": text, "a": f"premoe_{label}", "b": "float", "verdict": "not judged: the float "
                            "model scores 0 on a seed"})
                continue
            out.append({"claim": text, "a": f"premoe_{label}", "b": "float", "a_summary": summary(ratios),
                        "verdict": _zoo.goal_verdict(summary(ratios), 0.95, higher_is_better=True)})
    speed = [s["decode_speedup"] for s in per_seed]
    out.append({"claim": "4-bit decoding faster than float (batch 1, CPU)", "a": "hqq4", "b": "float",
                "a_summary": summary(speed), "verdict": _zoo.goal_verdict(summary(speed), 1.0, higher_is_better=True)})
    return out


def plot(per_seed: list[dict], path: Path) -> None:
    plt = _zoo.plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for family, marker in (("hqq", "o"), ("gptq", "s"), ("mcmoe", "^")):
        names = [v for v in QUANT if v.startswith(family) and v in per_seed[0]["variants"]]
        if not names:
            continue
        bits = [per_seed[0]["variants"][v]["avg_bits"] for v in names]
        losses = np.asarray([[s["variants"][v]["val_loss"] for v in names] for s in per_seed])
        a1.errorbar(bits, losses.mean(0), yerr=losses.std(0, ddof=1) if len(per_seed) > 1 else None, marker=marker,
                    label=family, capsize=3)
    f = np.asarray([s["float"]["val_loss"] for s in per_seed])
    a1.axhline(f.mean(), color="k", ls="--", label="float")
    a1.set(xlabel="average bits per expert weight (codes only)", ylabel="validation loss (nats/byte)",
           title="quantized experts")
    a1.legend()
    rates = np.asarray([[x["skip_rate"] for x in s["skip"]] for s in per_seed])
    losses = np.asarray([[x["val_loss"] for x in s["skip"]] for s in per_seed])
    a2.errorbar(rates.mean(0), losses.mean(0), yerr=losses.std(0, ddof=1) if len(per_seed) > 1 else None, marker="o",
                capsize=3)
    for r, x, y in zip(SKIP_RATIOS, rates.mean(0), losses.mean(0)):
        a2.annotate(str(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    a2.set(xlabel="share of expert slots skipped", ylabel="validation loss (nats/byte)",
           title="online expert skipping (ratio annotated)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(_zoo.SEEDS))
    ap.add_argument("--examples", type=int, default=100, help="test examples per algorithmic task")
    ap.add_argument("--windows", type=int, default=16, help="test windows per text domain")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--premoe-examples", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--tasks", default="all", help="evaluation tasks (default all)")
    ap.add_argument("--variants", nargs="+", choices=list(QUANT), default=list(QUANT),
                    help="quantized variants (default all; hqq4 is always included: decoding is timed on it)")
    ap.add_argument("--train-only", action="store_true", help="train the seeds' models and stop (slices)")
    ap.add_argument("--results-only", action="store_true", help="measure the seeds' models, cache their results and "
                    "stop, without the report (slices: one seed per process)")
    a = ap.parse_args(argv)
    a.variants = sorted(set(a.variants) | {"hqq4"}, key=list(QUANT).index)
    if len(a.seeds) < 2 and not (a.train_only or a.results_only):
        ap.error("--seeds needs at least two seeds for an interval")
    data = mix_spec(",".join(t.name for t in evals.resolve_tasks("all")))  # the model learns every task
    tasks = evals.resolve_tasks(a.tasks)
    results = [trained(a.preset, a.steps, s, data) for s in a.seeds]
    if a.train_only:
        return
    t0 = time.perf_counter()
    per_seed = [seed_results(r, tasks, a) for r in results]
    if a.results_only:
        return
    claims = claims_of(per_seed, tasks)
    _zoo.print_claims([c for c in claims if "difference" in c])
    for c in claims:
        if "difference" not in c:
            value = f"{_zoo.fmt_ci(c['a_summary'])} -> " if "a_summary" in c else ""
            print(f"{c['claim']}: {value}{c['verdict']}")
    _zoo.RESULTS.mkdir(exist_ok=True)
    name = f"quantize_{a.preset}"
    plot(per_seed, _zoo.RESULTS / f"{name}.png")
    payload = _zoo.payload("quantize", a.steps or preset(a.preset)["train"]["steps"], a.seeds, claims,
                           preset=a.preset, data=data, group_size=GROUP_SIZE, quant_code_version=QUANT_VERSION,
                           per_seed=per_seed, tasks=[t.name for t in tasks], wall_s=time.perf_counter() - t0)
    payload["command"] = (f"python experiments/quantize.py --preset {a.preset}"
                          + (f" --steps {a.steps}" if a.steps else "") + " --seeds " + " ".join(map(str, a.seeds))
                          + ("" if a.variants == list(QUANT) else " --variants " + " ".join(a.variants))
                          + ("" if a.tasks == "all" else f" --tasks {a.tasks}"))
    (_zoo.RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {_zoo.RESULTS / name}.json and .png")


if __name__ == "__main__":
    main()
