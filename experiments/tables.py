"""Regenerate the results tables of README.md and experiments/README.md from
experiments/results/*.json.

A generated block sits between two markers in the markdown,

    <!-- table:NAME -->
    ...
    <!-- /table:NAME -->

and is rewritten by the renderer `NAME` of `RENDERERS` (a function of the results directory
returning markdown). Nothing between the markers is typed by hand.

    python experiments/tables.py            # rewrite the blocks
    python experiments/tables.py --check    # exit 1, printing a diff, if a block is stale
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _speed_tables import speed as _speed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
DOCUMENTS = (ROOT / "README.md", ROOT / "experiments" / "README.md")
BLOCK = re.compile(r"(<!-- table:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)

RENDERERS: dict[str, Callable[[Path], str]] = {}


def renderer(fn):
    RENDERERS[fn.__name__] = fn
    return fn


def load(results: Path, name: str) -> dict:
    path = results / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(str(path))
    return json.loads(path.read_text())


def by_preset(results: Path, name: str) -> dict:
    """{preset: the results of `name`_<preset>.json} for the base sizes measured (tiny, small)."""
    found = {p: load(results, f"{name}_{p}") for p in ("tiny", "small") if (results / f"{name}_{p}.json").exists()}
    if not found:
        raise FileNotFoundError(str(results / f"{name}_tiny.json"))
    return found


def num(x: float, digits: int = 4) -> str:
    return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.{digits}f}"


def mean_sd(s: dict, digits: int = 4) -> str:
    return f"{num(s['mean'], digits)} ± {num(s['sd'], digits)}"


def diff_ci(d: dict, digits: int = 4) -> str:
    lo, hi = d["ci95"]
    return f"{d['mean']:+.{digits}f} (95% CI {lo:+.{digits}f}..{hi:+.{digits}f})"


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "-" * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# --- routing and balance -------------------------------------------------------------------

ROUTING = (  # results file, what the experiment compares
    ("moe_vs_dense", "MoE vs a dense FFN at equal active parameters"),
    ("aux_loss_free", "aux-loss-free bias (DeepSeek-V3) vs the Switch balance loss"),
    ("global_batch_lbl", "global- vs micro-batch balance loss (Qwen)"),
    ("top_p_routing", "top-p routing (dynamic experts per token)"),
    ("null_experts", "null experts (AdaMoE)"),
    ("moepp", "MoE++ zero-computation experts"),
    ("fine_grained", "fine-grained + shared experts (DeepSeekMoE)"),
    ("thor", "THOR stochastic experts vs learned top-1"),
    ("scmoe", "self-contrast decoding (SCMoE) vs greedy"),
    ("rice", "expert steering (RICE) toward a task"),
    ("uoe", "unlearning in one expert (UOE) vs the whole model"),
    ("compressed_experts", "compressed experts vs full top-2 and a drop to top-1"),
    ("pregate", "pre-gating (Read-ME) vs per-layer routing: quality and expert-cache hits"),
    ("mowst", "Mowst: a weak expert that skips the model where it is confident"),
    ("union_of_experts", "selective heads (Union of Experts) vs every head and a fixed half-size attention"),
    ("home", "HoME multi-task head vs MMoE and one shared mixture"),
)


def _claim_row(c: dict, digits: int = 4) -> list[str]:
    """One claim as a row: the claim, both sides' mean ± sd, the difference and the verdict."""
    return [c["claim"], f"{c['a']} {mean_sd(c['a_summary'], digits)} vs {c['b']} {mean_sd(c['b_summary'], digits)}",
            diff_ci(c["difference"], digits), f"**{c['verdict']}**"]


def _claim_rows(data: dict) -> list[list[str]]:
    rows = []
    for c in data["claims"]:
        margin = "" if c.get("margin") is None else f" (margin {c['margin']})"
        rows.append([c["claim"] + margin, *_claim_row(c)[1:]])
    if "layers" in data:
        n = len(data["layers"])
        rows.append(["per MoE layer: more specialised", f"higher in {data['layers_higher_by_mean']} of {n} layers by "
                     "the seed mean", "; ".join(f"layer {x['layer']} {diff_ci(x['difference'], 3)}" for x in data["layers"]),
                     f"**{data['layers_higher_by_interval']} of {n} reproduced**"])
    for c in data.get("adaptivity", []):
        rows.append([c["claim"], f"rho {mean_sd(c['summary'], 3)}", f"95% CI {c['summary']['ci95'][0]:+.3f}.."
                     f"{c['summary']['ci95'][1]:+.3f}", f"**{c['verdict']}**"])
    return rows


@renderer
def routing_claims(results: Path) -> str:
    """Every claim of the routing experiments, one row each, with the seeds' numbers."""
    out = []
    for name, title in ROUTING:
        if not (results / f"{name}.json").exists():
            out.append(f"**{title}** (`python experiments/{name}.py`): not measured yet\n")
            continue
        data = load(results, name)
        if "claims" not in data:
            out.append(f"**{title}** (`{data['command']}`): one seed, earlier code; not judged: {data['verdict']}\n")
            continue
        seeds = ", ".join(str(s) for s in data["seeds"])
        out.append(f"**{title}**: `{data['command']}` (seeds {seeds}, {data['steps']} steps, "
                   f"code {data['code_version']})\n")
        out.append(table(["claim", "mean ± sd over seeds", "difference a - b", "verdict"], _claim_rows(data)))
    return "\n".join(out)


@renderer
def routing_summary(results: Path) -> str:
    """One line per routing experiment: its verdicts."""
    rows = []
    for name, title in ROUTING:
        cmd = f"`python experiments/{name}.py`"
        if not (results / f"{name}.json").exists():
            rows.append([title, cmd, "not measured yet"])
            continue
        data = load(results, name)
        if "claims" not in data:
            rows.append([title, cmd, "one seed, earlier code: not judged"])
            continue
        verdicts = [f"{c['claim']}: **{c['verdict']}**" for c in data["claims"] + data.get("adaptivity", [])]
        rows.append([title, cmd, "; ".join(verdicts)])
    return table(["experiment", "command", "verdicts"], rows)


@renderer
def moe_vs_dense(results: Path) -> str:
    data = load(results, "moe_vs_dense")
    if "claims" not in data:
        return f"One seed, earlier code: {data['verdict']}\n"
    rows = [[r["name"], f"{r['active']:,}", f"{r['total']:,}", r["val"]] for r in data["rows"]]
    c = data["claims"][0]
    return (table(["model", "active params", "total params", "validation loss (nats/byte, mean ± sd)"], rows, "-rrr")
            + f"\nDifference MoE - dense: {diff_ci(c['difference'])}, {len(data['seeds'])} seeds: **{c['verdict']}**.\n")


@renderer
def task_mixture(results: Path) -> str:
    """MoE vs dense per task of the evaluation suite, and the experts' task information."""
    data = load(results, "task_mixture")
    rows = []
    for c in data["claims"]:
        digits = 3 if c["higher_is_better"] else 4
        rows.append([c["claim"].split(": ")[0], mean_sd(c["a_summary"], digits), mean_sd(c["b_summary"], digits),
                     diff_ci(c["difference"], digits), f"**{c['verdict']}**"])
    info = [sum(layer) / len(layer) for layer in zip(*data["task_information"])]
    seeds = ", ".join(str(s) for s in data["seeds"])
    return (f"`{data['command']}` (seeds {seeds}, {data['steps']} steps, code {data['code_version']}; "
            f"{data['examples']} test examples per algorithmic task):\n\n"
            + table(["task (metric)", "MoE", "dense", "difference MoE - dense", "MoE beats dense?"], rows, "-rrr-")
            + "\nMutual information between a slot's task and its expert, per MoE layer (bits, mean over seeds): "
            + " / ".join(f"{x:.3f}" for x in info) + ".\n")


@renderer
def quantize(results: Path) -> str:
    """Quantized experts, online skipping and PreMoe: the numbers per variant and the claims, for
    each base size measured."""
    return "\n".join(_quantize_one(data) for data in by_preset(results, "quantize").values())


def _quantize_one(data: dict) -> str:
    per_seed = data["per_seed"]
    variants = list(per_seed[0]["variants"])
    rows = [["float", "32", mean_sd(summary_of([s["float"]["val_loss"] for s in per_seed])), "1.000"]]
    for v in variants:
        vals = [s["variants"][v] for s in per_seed]
        rows.append([v, f"{vals[0]['bits_per_weight']:.2f}", mean_sd(summary_of([x["val_loss"] for x in vals])),
                     f"{vals[0]['expert_bytes'] / vals[0]['expert_bytes_float']:.3f}"])
    claims = []
    for c in data["claims"]:
        if "difference" in c:
            claims.append([c["claim"], f"{c['a']} {mean_sd(c['a_summary'])} vs {c['b']} {mean_sd(c['b_summary'])}",
                           diff_ci(c["difference"]), f"**{c['verdict']}**"])
        else:
            value = mean_sd(c["a_summary"], 3) if "a_summary" in c else ""
            claims.append([c["claim"], value, "", f"**{c['verdict']}**"])
    seeds = ", ".join(str(s) for s in data["seeds"])
    return (f"`{data['command']}` (preset {data['preset']}, seeds {seeds}, code {data['code_version']}):\n\n"
            + table(["experts", "bits per weight (scales and zeros included)", "validation loss (nats/byte)",
                     "expert bytes / float"], rows, "-rrr")
            + "\n" + table(["claim", "mean ± sd over seeds", "difference a - b", "verdict"], claims))


@renderer
def lora_experts(results: Path) -> str:
    """LoRA against MixLoRA, SMoRA and DynMoLE on a frozen dense model of each base size
    measured: per task and the claims."""
    return "\n".join(_lora_experts_one(data) for data in by_preset(results, "lora_experts").values())


def _lora_experts_one(data: dict) -> str:
    tasks, scores = data["tasks"], data["scores"]
    rows = []
    for name, per_seed in [("frozen base", data["frozen_base"]), *scores.items()]:
        cells = [mean_sd(summary_of([s[t] for s in per_seed]), 3) for t in tasks]
        mean = mean_sd(summary_of([sum(s[t] for t in tasks) / len(tasks) for s in per_seed]), 3)
        params = f"{data['trainable_params'][name]:,}" if name in data["trainable_params"] else "0"
        rows.append([name, params, *cells, mean])
    claims = [_claim_row(c) for c in data["claims"]
              if c["claim"].startswith(("mean", "validation"))]
    seeds = ", ".join(str(s) for s in data["seeds"])
    return (f"`{data['command']}` (base: dense {data['preset']}, {data['base_steps']} steps on the text domains; "
            f"{data['steps']} fine-tuning steps on the algorithmic tasks; seeds {seeds}; code {data['code_version']}; "
            f"exact match on {data['examples']} test examples per task):\n\n"
            + table(["adapter", "trainable params", *tasks, "mean"], rows, "-r" + "r" * (len(tasks) + 1))
            + "\n" + table(["claim", "mean ± sd over seeds", "difference a - b", "verdict"], claims))


@renderer
def moe_build(results: Path) -> str:
    """An MoE built from dense fine-tunes (jmoe moe-build) against its specialists and their
    weight average, before and after a router-only fine-tune."""
    data = load(results, "moe_build")
    tasks = data["tasks"]
    rows = []
    for name, per_seed in data["scores"].items():
        cells = [mean_sd(summary_of([s[t] for s in per_seed]), 3) for t in tasks]
        rows.append([name, *cells, mean_sd(summary_of([sum(s[t] for t in tasks) / len(tasks) for s in per_seed]), 3)])
    claims = [_claim_row(c) for c in data["claims"]]
    seeds = ", ".join(str(s) for s in data["seeds"])
    return (f"`{data['command']}` (base: dense {data['preset']}, {data['base_steps']} steps on the text domains; "
            f"{data['steps']} steps of full fine-tuning per task; top-{data['top_k']}; {data['router_steps']} steps "
            f"of router-only fine-tuning on the task mixture; seeds {seeds}; code {data['code_version']}; exact match "
            f"on {data['examples']} test examples per task; specialists: each task's own fine-tune on that task):\n\n"
            + table(["model", *tasks, "mean"], rows, "-" + "r" * (len(tasks) + 1))
            + "\n" + table(["claim", "mean ± sd over seeds", "difference a - b", "verdict"], claims))


@renderer
def merging_benchmark(results: Path) -> str:
    """Multi-task merging of language models from each base size measured (tiny, small): the
    normalised score of every method per task, its mean and how long the merge took, the
    claims; with both sizes, every method's score from the small base against the tiny one."""
    found = by_preset(results, "merging_benchmark")
    parts = [_merging_benchmark_one(data) for data in found.values()]
    if len(found) == 2:
        parts.append(_merging_scale(found["tiny"], found["small"]))
    return "\n".join(parts)


def _merging_benchmark_one(data: dict) -> str:
    tasks, norm = data["tasks"], data["normalized"]
    rows = []
    for name, per_seed in norm.items():
        cells = [mean_sd(summary_of([s[t] for s in per_seed]), 2) for t in tasks]
        seconds = [i.get("seconds") for i in data["learned"].get(name, [])]
        took = f"{sum(seconds) / len(seconds):.0f}" if seconds and None not in seconds else ""
        rows.append([name, *cells, mean_sd(summary_of(data["mean_normalized"][name]), 3), took])
    claims = [_claim_row(c, 3) for c in data["claims"]]
    seeds = ", ".join(str(s) for s in data["seeds"])
    return (f"`{data['command']}` (base: dense {data['preset']}, {data['base_steps']} steps on the text domains; "
            f"{data['steps']} steps of full fine-tuning per task; seeds {seeds}; code {data['code_version']}; "
            f"{data['examples']} test examples per algorithmic task, {data['windows']} windows per text domain; "
            "normalised score: merged / the task's own fine-tune, own / merged in bits per byte; merge time in "
            "seconds on this machine's CPU):\n\n"
            + table(["model", *tasks, "mean", "merge s"], rows, "-" + "r" * (len(tasks) + 2))
            + "\n" + table(["claim", "mean ± sd over seeds", "difference a - b", "verdict"], claims))


def _merging_scale(tiny: dict, small: dict) -> str:
    """Each method's mean normalised score from the small base against the tiny one, paired
    by seed (the same seeds, tasks and methods)."""
    from jmoe.evals.stats import difference_verdict, paired_difference

    seeds = [s for s in small["seeds"] if s in tiny["seeds"]]
    rows = []
    for name in small["mean_normalized"]:
        if name not in tiny["mean_normalized"] or name == "individual":  # 1 by definition
            continue
        a = [small["mean_normalized"][name][small["seeds"].index(s)] for s in seeds]
        b = [tiny["mean_normalized"][name][tiny["seeds"].index(s)] for s in seeds]
        diff = paired_difference(a, b)
        rows.append([name, mean_sd(summary_of(b), 3), mean_sd(summary_of(a), 3), diff_ci(diff, 3),
                     f"**{difference_verdict(diff)}**"])
    return ("The same merges from a tiny and a small base (claim: the larger base merges better, as \"What Matters "
            f"for Model Merging at Scale\" finds; paired by seed, seeds {', '.join(map(str, seeds))}):\n\n"
            + table(["model", "tiny", "small", "small - tiny", "verdict"], rows, "-rrrr"))


@renderer
def pleas_merge(results: Path) -> str:
    """PLeaS against permutation alone and weight averaging, per merged width, and the claims."""
    data = load(results, "pleas_merge")
    rows = [[name, str(data["widths"][name]), mean_sd(summary_of(vals), 4)] for name, vals in data["normalized"].items()]
    claims = [_claim_row(c) for c in data["claims"]]
    pairs = "; ".join(f"{a} x {b}" for a, _, b, _ in data["pairs"])
    return (f"`{data['command']}` (bases: dense {data['preset']}, one per seed ({', '.join(map(str, data['seeds']))}), "
            f"{data['base_steps']} steps; {data['steps']} steps of fine-tuning per domain; pairs: {pairs}; code "
            f"{data['code_version']}; {data['windows']} test windows per domain; normalised score: own bits per byte / "
            "merged, mean over the pair's two domains):\n\n"
            + table(["merge", "d_ff", "normalised score"], rows, "-rr")
            + "\n" + table(["claim", "mean ± sd over pairs", "difference a - b", "verdict"], claims))


@renderer
def placement(results: Path) -> str:
    """Excess load and cross-device traffic of every placement method per trace source and
    device count (held-out half of each trace), and the claims."""
    data = load(results, "placement")
    rows = []
    for source, by_n in data["results"].items():
        for n, per_seed in by_n.items():
            for name in data["methods"]:
                vals = lambda f: summary_of([s[name][f] for s in per_seed])  # noqa: E731
                rows.append([source, n, name, f"{per_seed[0][name]['redundant_share']:.1%}",
                             mean_sd(vals("excess_load"), 3), mean_sd(vals("traffic"), 3), f"{vals('seconds')['mean']:.1f}"])
    claims = []
    for c in data["claims"]:
        if "difference" in c:
            claims.append(_claim_row(c, 3))
        else:
            lo, hi = c["a_summary"]["ci95"]
            claims.append([c["claim"], mean_sd(c["a_summary"], 3), f"95% CI {lo:.3f}..{hi:.3f}", f"**{c['verdict']}**"])
    seeds = ", ".join(str(s) for s in data["seeds"])
    return (f"`{data['command']}` (seeds {seeds}; code {data['code_version']}; placements made from the first half "
            f"of each {data['tokens']:,}-token trace, judged on the second half: excess load per layer and window of "
            f"{data['window']:,} tokens, averaged; traffic over the whole half; seconds to place on this machine):\n\n"
            + table(["trace", "devices", "placement", "redundant slots", "excess load", "cross-device traffic",
                     "seconds"], rows, "-r-rrrr")
            + "\n" + table(["claim", "mean ± sd over seeds", "interval", "verdict"], claims))


@renderer
def uoe(results: Path) -> str:
    """Unlearning one task in one expert (UOE) against the whole model, at each one's stopping point."""
    data = load(results, "uoe")
    rows = []
    for method in ("uoe", "full"):
        picks = data["picked"][method]
        rows.append([method, mean_sd(summary_of([p["step"] for p in picks]), 0),
                     mean_sd(summary_of([p["forget_share"] for p in picks]), 3),
                     mean_sd(summary_of([p["utility"] for p in picks]), 3)])
    claims = [_claim_row(c, 3) for c in data["claims"]]
    targets = "; ".join(f"layer {t[0]} expert {t[1]}" for t in data["targets"])
    return (f"`{data['command']}` (the tiny MoE trained {data['steps']} steps on the task mixture, seeds "
            f"{', '.join(map(str, data['seeds']))}; gradient ascent on {data['batches']} batches of {data['forget']}'s "
            f"text, Adam lr {data['lr']}; scored after {', '.join(map(str, data['checkpoints']))} steps; exact match on "
            f"{data['examples']} test examples per task; code {data['code_version']}; UOE's experts: {targets}):\n\n"
            + table(["unlearning", "stopping step", f"{data['forget']}: accuracy kept", "other tasks: accuracy kept"],
                    rows, "-rrr")
            + "\n" + table(["claim", "mean ± sd over seeds", "difference a - b", "verdict"], claims))


@renderer
def home(results: Path) -> str:
    """Multi-task heads on the frozen task-mixture MoE: parameters, mean and per-task validation
    loss, zero expert units and degraded gate weights, and the claims."""
    data = load(results, "home")
    kinds = list(data["head_loss"])
    rows = [["the model alone", "", mean_sd(summary_of(data["model_loss"])), "", ""]]
    for k in kinds:
        st = data["stats"][k]
        experts = f" ({data['experts'][k]} experts)" if data["experts"][k] else ""
        rows.append([k, f"{data['head_params'][k]:,}{experts}", mean_sd(summary_of(data["head_loss"][k])),
                     mean_sd(summary_of(st["zero_share"]), 3), mean_sd(summary_of(st["degraded_share"]), 3)])
    per_task = [[t, mean_sd(summary_of(data["model_per_task"][t]))]
                + [mean_sd(summary_of(data["per_task"][k][t])) for k in kinds] for t in data["model_per_task"]]
    claims = [_claim_row(c) for c in data["claims"]]
    return (f"`{data['command']}` (the tiny MoE trained {data['steps']} steps on the task mixture, frozen; heads "
            f"trained {data['head_steps']} steps at lr {data['lr']}; validation: {data['eval_windows']} windows per "
            f"task; seeds {', '.join(map(str, data['seeds']))}; code {data['code_version']}):\n\n"
            + table(["head", "parameters", "validation loss, mean over tasks", "expert units at 0",
                     "gate weights under 0.01"], rows, "-rrrr")
            + "\n" + table(["task", "the model alone", *kinds], per_task, "-" + "r" * (1 + len(kinds)))
            + "\n" + table(["claim", "mean ± sd over seeds", "difference a - b", "verdict"], claims))


def summary_of(values) -> dict:
    """Mean and sample standard deviation (what `mean_sd` shows)."""
    v = [float(x) for x in values]
    mean = sum(v) / len(v)
    sd = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
    return {"mean": mean, "sd": sd}


METHOD_NAMES = {"msmoe": "M-SMoE", "prune": "prune", "average": "average", "random": "random"}


@renderer
def scmoe(results: Path) -> str:
    """Self-contrast decoding against greedy decoding: exact match per task and the claims."""
    data = load(results, "scmoe")
    rows = [[v, *(mean_sd(summary_of([sc[t] for sc in data["scores"][v]]), 3) for t in data["tasks"]),
             mean_sd(summary_of(data["mean_exact_match"][v]), 3)] for v in data["variants"]]
    claims = [_claim_row(c, 3) for c in data["claims"]]
    return (f"`{data['command']}` (the tiny MoE trained {data['steps']} steps on the task mixture, seeds "
            f"{', '.join(map(str, data['seeds']))}; alpha {data['alpha']}, beta {data['beta']}; exact match on "
            f"{data['examples']} test examples per task, greedy; code {data['code_version']}):\n\n"
            + table(["decoding", *data["tasks"], "mean"], rows, "-" + "r" * (len(data["tasks"]) + 1))
            + "\n" + table(["claim", "mean ± sd over seeds", "difference a - b", "verdict"], claims))


@renderer
def rice(results: Path) -> str:
    """Expert steering toward each task: the target task's and the other tasks' accuracy."""
    data = load(results, "rice")
    rows = [[k, mean_sd(summary_of(data["target_accuracy"][k]), 3), mean_sd(summary_of(data["others_accuracy"][k]), 3)]
            for k in data["target_accuracy"]]
    claims = [_claim_row(c, 3) for c in data["claims"]]
    return (f"`{data['command']}` (the tiny MoE trained {data['steps']} steps on the task mixture, seeds "
            f"{', '.join(map(str, data['seeds']))}; {data['prompts']} contrastive prompts a side; exact match on "
            f"{data['examples']} test examples per task; code {data['code_version']}):\n\n"
            + table(["steering", "target task", "other tasks"], rows, "-rr")
            + "\n" + table(["claim", "mean ± sd over seeds", "difference a - b", "verdict"], claims))


@renderer
def compressed_experts(results: Path) -> str:
    """Fine-tuning with compressed experts against the full model and a drop to top-1: exact
    match, validation loss and active parameters per token."""
    data = load(results, "compressed_experts")
    full = data["active_params"]["full"]
    rows = [[v, f"{data['active_params'][v] / 1e6:.3f}M ({data['active_params'][v] / full:.0%})",
             mean_sd(summary_of(data["exact_match"][v]), 3), mean_sd(summary_of(data["val_loss"][v]))]
            for v in data["exact_match"]]
    claims = [_claim_row(c, 3) for c in data["claims"]]
    return (f"`{data['command']}` (the tiny MoE trained {data['steps']} steps on the task mixture, then "
            f"{data['ft_steps']} fine-tuning steps at lr {data['lr']}; seeds {', '.join(map(str, data['seeds']))}; "
            f"exact match on {data['examples']} test examples per algorithmic task; code {data['code_version']}):\n\n"
            + table(["fine-tuned", "active parameters per token", "mean exact match", "validation loss"], rows, "-rrr")
            + "\n" + table(["claim", "mean ± sd over seeds", "difference a - b", "verdict"], claims))


@renderer
def pregate(results: Path) -> str:
    """Pre-gating against per-layer routing: validation loss, the gate's recall, and the decode
    hit rate of an LRU expert cache per size, with the gate's prefetch."""
    data = load(results, "pregate")
    sizes = data["hits"]["top2"][0]["sizes"]
    rows = []
    for v, hs in data["hits"].items():
        curves = [summary_of([h["lru_gate"][i] for h in hs]) for i in range(len(sizes))]
        rows.append([v, mean_sd(summary_of(data["val_loss"][v])), mean_sd(summary_of(data["gate_recall"][v]), 3),
                     *(mean_sd(c, 3) for c in curves)])
    return (f"`{data['command']}` (tiny preset, seeds {', '.join(map(str, data['seeds']))}; greedy decoding of "
            f"{data['prompts']} prompts, {data['new_tokens']} new tokens each, at batch 1; code "
            f"{data['code_version']}). Hit rate of an LRU cache with the cross-layer gate's prefetch, by expert slots "
            "per MoE layer:\n\n"
            + table(["routing", "validation loss", "gate top-k recall", *(f"{s} slots" for s in sizes)], rows,
                    "-" + "r" * (len(sizes) + 2))
            + "\n" + table(["claim", "mean ± sd over seeds", "difference a - b", "verdict"], _claim_rows(data)))


@renderer
def mowst(results: Path) -> str:
    """Mowst against the strong model fine-tuned alone: validation loss of the random routing
    and of threshold 0.5, the shares of tokens that skip the model, and decoding."""
    data = load(results, "mowst")
    rows = [["strong alone", mean_sd(summary_of(data["strong_val_loss"])), "", "", "", "", "", ""]]
    for v, sweeps in data["sweep"].items():
        half = [s["0.5"] for s in sweeps]
        d = data["decode"][v]
        rows.append([v, mean_sd(summary_of([h["expected_loss"] for h in half])),
                     mean_sd(summary_of([h["expected_skip"] for h in half]), 3),
                     mean_sd(summary_of([h["threshold_loss"] for h in half])),
                     mean_sd(summary_of([h["threshold_skip"] for h in half]), 3),
                     mean_sd(summary_of(d["skip_share"]), 3), mean_sd(summary_of(d["strong_calls_per_token"]), 2),
                     mean_sd(summary_of(d["speed_ratio"]), 2)])
    return (f"`{data['command']}` (the tiny MoE trained {data['steps']} steps on the task mixture; {data['rounds']} "
            f"rounds of {data['weak_steps']} weak and {data['strong_steps']} strong steps at lr {data['lr']}; seeds "
            f"{', '.join(map(str, data['seeds']))}; code {data['code_version']}). Skip: the share of tokens that "
            "skip the model; decoding: greedy, one prompt at a time, against the plain engine:\n\n"
            + table(["model", "validation loss (random routing)", "skip (random)", "loss at threshold 0.5",
                     "skip at 0.5", "decoding skip", "model calls per token", "decode speed vs engine"], rows,
                    "-rrrrrrr")
            + "\n" + table(["claim", "mean ± sd over seeds", "difference a - b", "verdict"], _claim_rows(data)))


@renderer
def union_of_experts(results: Path) -> str:
    """Selective heads against every head and a fixed attention of the same per-token size:
    validation loss, parameters and the per-token query/output work."""
    data = load(results, "union_of_experts")
    rows = [[v, mean_sd(summary_of(data["val_loss"][v])), f"{data['params'][v]['active'] / 1e6:.3f}M",
             f"{data['params'][v]['total'] / 1e6:.3f}M", f"{data['attention_work'][v] / 1e3:.0f}k"]
            for v in data["val_loss"]]
    return (f"`{data['command']}` (tiny preset, seeds {', '.join(map(str, data['seeds']))}; code "
            f"{data['code_version']}):\n\n"
            + table(["attention", "validation loss", "active parameters", "parameters",
                     "query/output multiply-adds per token"], rows, "-rrrr")
            + "\n" + table(["claim", "mean ± sd over seeds", "difference a - b", "verdict"], _claim_rows(data)))


@renderer
def merge_then_compress(results: Path) -> str:
    """Expert merging and compression of the tiny E=8 model: validation loss as reduced and
    after the recovery fine-tune."""
    data = load(results, "merge_then_compress")
    seeded = "claims" in data

    def loss(x):
        return mean_sd(x) if seeded else f"{x:.4f}"

    def order(r):
        return (r["name"].startswith("mcsmoe"), -r["experts"], r["val"]["mean"] if seeded else r["val"])

    rows = [[METHOD_NAMES.get(r["name"], r["name"].replace("mcsmoe", "MC-SMoE")), str(r["experts"]),
             f"{r['expert_memory']:.0%}", f"{r['memory']:.0%}", loss(r["val"]), loss(r["ft"])]
            for r in sorted(data["rows"], key=order)]
    out = table(["method", "experts/layer", "expert memory", "model memory", "as reduced", "fine-tuned"], rows, "-rrrrr")
    if seeded:
        seeds = ", ".join(str(x) for x in data["seeds"])
        out += (f"\nThe original models: {mean_sd(data['original'])}, and {mean_sd(data['original_ft'])} after the same "
                f"fine-tune (`{data['command']}`, seeds {seeds}, code {data['code_version']}).\n\n"
                + table(["claim", "mean ± sd over seeds", "difference a - b", "verdict"], _claim_rows(data)))
    else:
        out += (f"\nThe original model: {data['original_val']:.4f}, and {data['original_ft']:.4f} after the same "
                f"fine-tune. M-SMoE at 2 experts fine-tuned with distillation from the original: {data['kd_ft']:.4f}. "
                f"One seed (`{data['command']}`).\n")
    return out + _mcsmoe_memory_note(data)


def _mcsmoe_memory_note(data: dict) -> str:
    mc = [r for r in data["rows"] if r["name"].startswith("mcsmoe")]
    if not mc or mc[0]["report"].get("computes_with_factors"):
        return ""
    dense = next(r for r in data["rows"] if r["name"] == "msmoe" and r["experts"] == mc[0]["experts"])
    return (f"\nMC-SMoE's memory counts its low-rank and sparse factors, but this run's model computes with the dense "
            f"weights rebuilt from them: what it holds is {dense['expert_memory']:.0%} of the expert memory "
            f"({dense['memory']:.0%} of the model), as M-SMoE with {dense['experts']} experts.\n")


# --- speed ---------------------------------------------------------------------------------


@renderer
def bench_moe_layer(results: Path) -> str:
    data = load(results, "bench_moe_layer")
    rows = []
    for r in data["results"]:
        s = r["shape"]
        shape = f"E={s['num_experts']} k={s['top_k']} d={s['d_model']} f={s['d_ff']}"
        for variant in ("limit", "dropless", "capacity", "ragged_dot", "dense_all"):
            sec, ratio = r["seconds"][variant], r["ratio_to_limit"][variant]
            rows.append([shape, variant, f"{sec['forward'] * 1e3:.0f}", f"{ratio['forward']:.2f}",
                         f"{sec['forward_backward'] * 1e3:.0f}", f"{ratio['forward_backward']:.2f}"])
    return table(["shape", "variant", "forward ms", "/ limit", "fwd+bwd ms", "/ limit"], rows, "--rrrr")


@renderer
def quickstart(results: Path) -> str:
    """The README's first command: what `jmoe train` on the tiny preset reaches (the top-2
    runs of the routing experiments are that configuration)."""
    data = load(results, "moe_vs_dense")
    loss = data["claims"][0]["a_summary"]["mean"] if "claims" in data else data["summaries"]["moe"]["val_loss"]
    return f"validation loss of about {loss:.2f} nats/byte ({loss / math.log(2):.2f} bits/byte);\n"


@renderer
def merge_numbers(results: Path) -> str:
    data = load(results, "bench_merge")
    rows = [r for r in data["rows"] if "rss_vs_model" in r]
    ratios = [r["ratio_to_read"] for r in rows]
    return (f"(`python experiments/bench_merge.py`: merging three {data['model_gb']:.1f} GB "
            f"checkpoints peaks at {max(r['rss_vs_model'] for r in rows):.2f}x the RSS of one model and takes "
            f"{min(ratios):.2f}-{max(ratios):.2f}x the time of reading them)\n")


@renderer
def decode_numbers(results: Path) -> str:
    d = load(results, "bench_decode")
    cases = d["cases"]
    window = [c["decode_ratio_jmoe_over_window"] for c in cases]
    vs = [c["decode_ratio_jmoe_over_transformers"] for c in cases]
    by_batch = "; ".join(f"batch {b}: " + ", ".join(f"{c['model']} {c['decode_ratio_jmoe_over_transformers']:.2f}x"
                                                     for c in cases if c["batch"] == b)
                         for b in sorted({c["batch"] for c in cases}))
    return (f"decoding is {min(window):.0f}-{max(window):.0f}x faster than re-running the context window and "
            f"{min(vs):.2f}-{max(vs):.2f}x transformers' `generate` ({by_batch}; "
            "`python experiments/bench_decode.py`; see experiments/README.md).\n")


@renderer
def kernels_table(results: Path) -> str:
    """The Pallas grouped matmul on the GPU of the stored runs, per shape and token count."""
    runs = load(results, "bench_kernels_NVIDIA_H100_80GB_HBM3")["results"]
    runs += load(results, "bench_kernels_NVIDIA_H100_80GB_HBM3_tokens32768")["results"]
    names = {"mixtral": "Mixtral", "deepseek": "DeepSeek-V3"}
    rows, seen = [], set()
    for r in sorted(runs, key=lambda r: (list(names).index(r["shape"]) if r["shape"] in names else 9, r["tokens"])):
        name = names.get(r["shape"], r["shape"])
        if r["shape"] not in seen:
            name += f" (E={r['E']}, k={r['k']}, d={r['d']}, f={r['f']})"
            seen.add(r["shape"])
        rd = r["ragged_dot"]
        vs = f"{r['gmm_speedup_vs_ragged_dot']:.1f}x faster" if "failed" not in rd else "`ragged_dot` failed to compile"
        layer = " / ".join(f"{r['layer_fwd_s'][n] * 1e3:.1f}" if isinstance(r["layer_fwd_s"].get(n), float) else "-"
                           for n in ("pallas", "xla", "ragged_dot"))
        rows.append([name, f"{r['tokens']:,}", f"{r['gmm']['fwd_tflops']:.0f}", f"{r['gmm_vs_dense_tflops']:.2f}", vs,
                     layer + " ms"])
    return table(["shape", "tokens", "gmm TFLOP/s (fwd)", "/ dense matmul", "vs `ragged_dot`",
                  "dropless layer: Pallas / XLA / `ragged_dot`"], rows, "-rrrr-")


@renderer
def vs_transformers(results: Path) -> str:
    d = load(results, "bench_vs_transformers")
    names = {"block/mixtral": "the Mixtral-like MoE block", "block/olmoe": "the OLMoE-like block (E=64, k=8)",
             "model/mixtral": "the whole Mixtral-like model", "model/olmoe": "the whole OLMoE-like model"}
    parts = [f"{r['ratio']:.2f} for {names.get(r['case'], r['case'])}" for r in d["rows"]]
    worst = max(r["ratio"] for r in d["rows"])
    return (f"Against transformers {d['transformers']} on CPU (`{d['command']}`, same weights, {d['threads']} threads), "
            f"jmoe / transformers time is {', '.join(parts)}: "
            + ("faster in every case" if worst < 1 else "not faster in every case") + ".\n")


@renderer
def speed(results: Path) -> str:
    """The speed and memory benchmarks, one row each (`_speed_tables`)."""
    return _speed(results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if a block is stale")
    ap.add_argument("--results", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    stale = []
    for doc in DOCUMENTS:
        text = doc.read_text()

        def fill(m):
            name = m.group("name")
            if name not in RENDERERS:
                raise SystemExit(f"{doc.name}: unknown table {name!r}; known: {', '.join(RENDERERS)}")
            try:
                body = RENDERERS[name](a.results)
            except FileNotFoundError as e:  # an experiment not run yet
                body = f"Not measured yet: {Path(e.args[0]).name} is missing.\n"
            return m.group(1) + body + m.group(4)

        new = BLOCK.sub(fill, text)
        if new != text:
            stale.append(doc)
            if a.check:
                sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                           str(doc.relative_to(ROOT)), "generated"))
            else:
                doc.write_text(new)
                print(f"rewrote {doc.relative_to(ROOT)}")
    if a.check and stale:
        print(f"stale tables in {', '.join(str(d.relative_to(ROOT)) for d in stale)}: run python experiments/tables.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
