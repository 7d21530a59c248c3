"""The "Speed and memory" table of experiments/README.md, rendered from experiments/results/*.json.

`speed(results)` returns the whole markdown table, one row per benchmark, each row from its
results file(s); a row whose file is missing names the command that writes it. A file that
lacks a field the row needs raises KeyError naming the file.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path



class Record(dict):
    """A JSON object of one results file; a missing field raises KeyError naming the file.
    `results` is the folder the file was read from (set on the file's top-level object)."""

    def __init__(self, file: str, items):
        super().__init__(items)
        self.file = file
        self.results: Path | None = None

    def __missing__(self, key):
        raise KeyError(f"{self.file} has no field {key!r}")


def load(results: Path, name: str) -> Record:
    file = f"{name}.json"
    record = json.loads((results / file).read_text(), object_hook=lambda d: Record(file, d))
    record.results = results
    return record


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# --- formatting ----------------------------------------------------------------------------

MODELS = {"mixtral": "Mixtral-like", "olmoe": "OLMoE-like", "deepseek_v3": "DeepSeek-V3-like"}
GOAL = re.compile(r"\s*(<=|>=|<|>)\s*([0-9.]+)")


def and_join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def code(text: str) -> str:
    return f"`{text}`"


def commands(cmds) -> str:
    return " and ".join(code(c) for c in dict.fromkeys(cmds))


def command(data: Record) -> str:
    """The command recorded in `data`, as run from the repository root."""
    cmd = data["command"].split(" (")[0].strip()
    return cmd if cmd.startswith("python ") else f"python experiments/{cmd}"


def flag(data: Record, name: str) -> str:
    """The value of `--name` in the recorded command."""
    m = re.search(rf"--{name}[ =](\S+)", data["command"])
    if m is None:
        raise KeyError(f"{data.file}: its command has no --{name}")
    return m.group(1)


def span(values, fmt: str = "{:.2f}") -> str:
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


def sci(x: float) -> str:
    """One significant digit, e.g. 3e-3."""
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def two_digits(x: float) -> str:
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"


def ci(s: Record, fmt: str = "{:.2f}") -> str:
    lo, hi = s["ci95"]
    return f"CI {fmt.format(lo)}..{fmt.format(hi)}"


def goal_verdict(s: Record) -> str:
    """The verdict of a seed summary against its `goal` field (as jmoe.evals.stats.goal_verdict)."""
    m = GOAL.match(s["goal"])
    if m is None:
        raise ValueError(f"{s.file}: unreadable goal {s['goal']!r}")
    lo, hi = s["ci95"]
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "not enough seeds"
    goal = float(m.group(2))
    if m.group(1).startswith("<"):
        lo, hi, goal = -hi, -lo, -goal
    return "reproduced" if lo >= goal else "not reproduced" if hi < goal else "within noise"


# --- rows ----------------------------------------------------------------------------------

CASES = {"dropless": "dropless", "capacity": "capacity", "dropless_shared_gate": "dropless with a gated shared expert",
         "ep_padded": "padded all-to-all", "ep_ragged": "ragged", "ep_allgather": "all-gather"}


def before_after(d: Record) -> list[str]:
    rows = d["rows"]
    label = [CASES.get(r["case"], r["case"]) for r in rows]
    ratios = ", ".join(f"{name} {r['ratio']:.2f}" for name, r in zip(label, rows))
    slower = [name for name, r in zip(label, rows) if min(r["ratio_per_round"]) > 1]
    verdict = f"slower in every round: {', '.join(slower)}" if slower else "no case slower in every round: no slowdown"
    cmd = command(d)
    if "--rounds" not in cmd:
        cmd += f" --rounds {d['rounds']} --repeats {d['repeats']}"
    what = (f"the layer and the expert-parallel layer before and after the one-layer-body refactor ({d['base']} vs "
            f"this checkout), {d['tokens']:,} tokens: {d['cases']}")
    result = (f"time ratio this / base (median of {d['rounds']} alternating rounds): {ratios}; per-round ratios "
              f"{span([x for r in rows for x in r['ratio_per_round']])}, {verdict} (`results/bench_before_after.json`)")
    return [what, code(cmd), result]


def mib(row: Record) -> str:
    return f"{row['temp_bytes'] / 2**20:.0f}"


def grad_accum(d: Record) -> list[str]:
    rows, two, keep = d["rows"], d["rows"]["two_pass"], d["rows"]["keep"]
    diffs = [r[f] for name, r in rows.items() if name != "two_pass" for f in ("grad_norm_diff", "max_param_diff")]
    what = (f"gradient accumulation with a global-scope balance loss, grad_accum={d['grad_accum']}, batch "
            f"{d['batch_size']}x{d['seq_len']}, {d['model']['params'] / 1e6:.2f}M params")
    result = (f"step time relative to the two-pass step (a forward-only counting pass, then forward+backward per "
              f"micro-batch): one forward with every micro-batch's activations kept {keep['ratio_to_two_pass']:.2f}x "
              f"(and {keep['temp_bytes'] / two['temp_bytes']:.1f}x the temporary memory: {mib(keep)} vs {mib(two)} "
              f"MiB), one forward rematerialised {rows['recompute']['ratio_to_two_pass']:.2f}x, the unsplit batch "
              f"{rows['unsplit']['ratio_to_two_pass']:.2f}x; their gradient norms and updated parameters differ from "
              f"the two-pass step's by {sci(min(diffs))} to {sci(max(diffs))}. Removing the counting pass exactly "
              "costs the unsplit step's memory or a recomputation, so the step keeps it; it is skipped when the "
              "balance loss is off or not global (`results/bench_grad_accum.json`)")
    return [what, code(command(d)), result]


def moe_layer(d: Record) -> list[str]:
    res = d["results"]
    shapes = [f"E={r['shape']['num_experts']}, k={r['shape']['top_k']}" for r in res]
    dropless = " and ".join(f"{r['ratio_to_limit']['dropless']['forward']:.2f}x{' the limit' if i == 0 else ''} at {s}"
                            for i, (r, s) in enumerate(zip(res, shapes)))
    ragged = " and ".join(f"{two_digits(r['ratio_to_limit']['ragged_dot']['forward'])}x" for r in res)
    what = f"MoE layer on {d['meta']['backend'].upper()} vs the dense limit (one FFN over T*k tokens)"
    result = f"dropless forward {dropless}; `ragged_dot` {ragged} (see the README table)"
    return [what, code(command(d["meta"])), result]


def mesh_axes(mesh: str) -> dict[str, int]:
    return {name: int(size) for name, size in (axis.split("=") for axis in mesh.split(","))}


def expert_parallel(d: Record) -> list[str]:
    cfg, rows = d["config"], [r for r in d["rows"] if r["ratio_to_minimum"] is not None]
    k = cfg["top_k"]
    padded = [r["ratio_to_minimum"] for r in rows if r["impl"] == "padded"]
    gathered = [r for r in rows if r["impl"] == "allgather"]
    gather = ", ".join(f"{r['ratio_to_minimum']:.2f}x at `{r['mesh']}` (n_expert/k = "
                       f"{mesh_axes(r['mesh'])['expert'] / k:.1f})" for r in gathered)
    native = [r["native_ragged_bytes_per_token"] / r["minimum_bytes_per_token"] for r in rows if r["impl"] == "ragged"]
    what = f"expert-parallel bytes moved per token, E={cfg['num_experts']}, k={k}, {d['device']}"
    result = (f"padded all-to-all {span(padded)}x the minimum (capacity factor {cfg['dispatch_options']['capacity_factor']:g}), all-gather "
              f"{gather}, native `ragged_all_to_all` {span(native)}x (measured from its offsets: CPU runs it as an "
              "all-gather emulation)")
    return [what, code(command(d)), result]


def fssdp(d: Record) -> list[str]:
    cfg = d["config"]
    what = (f"FSSDP vs expert parallelism: bytes one device sends per forward+backward of an MoE layer, E={cfg['num_experts']}, "
            f"k={cfg['top_k']}, d={cfg['d_model']}, f={cfg['d_ff']}, {d['device']}")
    per = "; ".join(f"{r['tokens_per_expert']:,.0f} tokens per expert: padded all-to-all {r['ep_bytes'] / 1e6:.1f} MB, "
                    f"least exchange {r['ep_min_bytes'] / 1e6:.1f} MB, FSSDP {r['fssdp_bytes'] / 1e6:.1f} MB"
                    for r in d["rows"])
    ops = ", ".join(f"{op} {b / 1e6:.1f} MB" for op, b in d["rows"][-1]["fssdp_collectives"].items())
    result = (f"{per}. FSSDP's bytes follow the experts materialised, not the tokens ({ops}); it sends less than the "
              f"least token exchange above {d['crossover_tokens_per_expert']:,.0f} tokens per expert "
              f"(`results/bench_fssdp.json`)")
    return [what, code(command(d)), result]


def rebalance(d: Record) -> list[str]:
    cfg = d["config"]
    redundant = len(d["slots"]) - cfg["num_experts"]
    what = (f"expert-parallel step (forward+backward) on a skewed layer, default layout vs EPLB placement of its loads "
            f"(E={cfg['num_experts']}, k={cfg['top_k']}, {redundant} redundant slots) with the experts held in their "
            f"slots, and stored per expert and gathered into them every step, {d['tokens']:,} tokens, {d['device']}")
    per = "; ".join(f"{r['exchange']}: step {r['ratio_placed_over_default']:.2f}x ({r['ratio_range'][0]:.2f}-"
                    f"{r['ratio_range'][1]:.2f}; gathered {r['ratio_gathered_over_default']:.2f}x), dropped "
                    f"{r['dropped_fraction']['default']:.1%} -> {r['dropped_fraction']['eplb']:.1%}" for r in d["rows"])
    ex = d["rows"][0]["excess_load"]
    mb = lambda r, k: r["bytes_sent"][k] / 1e6
    sent = "; ".join(f"{r['exchange']} {mb(r, 'default'):.1f} -> {mb(r, 'eplb'):.1f} MB in slots, "
                     f"{mb(r, 'eplb_gathered'):.1f} MB gathered" for r in d["rows"])
    result = (f"placed / default: {per}; hottest device's excess load {ex['default']:.2f} -> {ex['eplb']:.2f}. Bytes one "
              f"device sends per step: {sent} (held in their slots, the {redundant} redundant rows' gradients are summed "
              f"between the copies; gathered, every expert, {d['expert_bytes'] / 1e6:.2f} MB each, moves into its slots "
              "and its gradient back). Simulated devices share the cores and the padded buffers do not shrink with "
              "balance, so these step times do not show the balance (the capacity step computes the slots it no longer "
              "drops); on real devices a step waits for the hottest one (`results/bench_rebalance.json`)")
    return [what, code(command(d)), result]


def rebalance_train(d: Record) -> list[str]:
    moe = d["model"]["moe"]
    what = (f"training steps with and without rebalancing (EPLB every {d['every']} steps, {d['redundant']} redundant "
            f"slots, experts held in their slots) of a model whose routers favour a few experts (E={moe['num_experts']}, "
            f"k={moe['top_k']}, {d['steps']} steps, one of each in turn), {d['device']}")
    per = "; ".join(f"{r['dispatch']}: step {r['ratio_rebalance_over_plain']:.2f}x ({r['ratio_range'][0]:.2f}-"
                    f"{r['ratio_range'][1]:.2f}), whole run {r['total_ratio']:.2f}x, a re-placement "
                    f"{r['replace_s'] * 1e3:.0f} ms, excess load {r['excess_load']['plain']:.2f} -> "
                    f"{r['excess_load']['rebalance']:.2f}, dropped {r['dropped_fraction']['plain']:.1%} -> "
                    f"{r['dropped_fraction']['rebalance']:.1%}, losses within {r['loss_max_rel_diff']:.0e} (relative)"
                    for r in d["rows"])
    result = (f"rebalancing / plain: {per}. Simulated devices share the cores and the padded buffers do not shrink with "
              "balance, so the step times show the rebalancing's costs ("
              f"{(moe['num_experts'] + d['redundant']) / moe['num_experts']:.1f}x the slots per device, the copies' "
              "gradient sum, the re-placements), not its gain; on real devices a step waits for the hottest one "
              "(`results/bench_rebalance_train.json`)")
    return [what, code(command(d)), result]


KERNEL_SHAPES = {"mixtral": "Mixtral", "deepseek": "DeepSeek-V3"}


def kernel_failure(message: str) -> str:
    quote = f'"{message.split(". ")[0]}"'
    return f"XLA:GPU's autotuner found no configuration ({quote})" if "Failed to get configs" in message else quote


def kernel_ragged_dot(runs: list[Record]) -> str:
    failed = [r for r in runs if "failed" in r["ragged_dot"]]
    if not failed:
        return " / ".join(f"{r['gmm_speedup_vs_ragged_dot']:.1f}" for r in runs) + "x faster than `ragged_dot`"
    where = "there" if len(failed) == len(runs) else f"at {failed[0]['tokens']:,} tokens"
    return f"`ragged_dot` fails {where}: {kernel_failure(failed[0]['ragged_dot']['failed'])}"


def kernel_layer(r: Record) -> str:
    names = {"pallas": "with Pallas", "xla": "pure XLA", "ragged_dot": "`ragged_dot`"}
    layer = r["layer_fwd_s"]
    order = [*(n for n in names if n in layer), *(n for n in layer if n not in names)]
    times = [f"{layer[n] * 1e3:.1f} ms {names.get(n, n)}" for n in order if not isinstance(layer[n], str)]
    return f"the dropless layer {' vs '.join(times)} ({r['tokens']:,} tokens)"


def kernel_shape(runs: list[Record], peak: float) -> str:
    a = runs[0]

    def pair(fmt, value):
        return " / ".join(fmt.format(value(r)) for r in runs)

    tflops = pair("{:.0f}", lambda r: r["gmm"]["fwd_tflops"])
    of_peak = pair("{:.2f}", lambda r: r["gmm"]["fwd_tflops"] * 1e12 / peak)
    of_dense = pair("{:.2f}", lambda r: r["gmm_vs_dense_tflops"])
    zipf = ""
    if all("zipf" in r for r in runs):  # runs from before the skewed sizes lack them
        zipf = (f"; on Zipf-skewed group sizes gmm / dense is {pair('{:.2f}', lambda r: r['zipf']['gmm_vs_dense_tflops'])}"
                f" forward and {pair('{:.2f}', lambda r: r['zipf']['gmm_vs_dense_fwd_bwd_tflops'])} forward+backward "
                f"(balanced: {pair('{:.2f}', lambda r: r['gmm_vs_dense_fwd_bwd_tflops'])})")
    return (f"{KERNEL_SHAPES.get(a['shape'], a['shape'])} shape (E={a['E']}, k={a['k']}, d={a['d']}, f={a['f']}): "
            f"gmm forward {tflops} TFLOP/s at {pair('{:,}', lambda r: r['tokens'])} tokens = {of_peak} of the bf16 "
            f"peak and {of_dense}x a dense batched matmul of the same FLOPs{zipf}; {kernel_ragged_dot(runs)}; "
            f"{kernel_layer(a)}")


def kernel_fwd_bwd(short: Record, long: Record) -> str:
    if "errata" in short or "errata" in long:
        return ("The forward+backward figures await a rerun on a GPU (the stored run timed the gradient of a loss "
                "linear in the output, from which XLA removed the forward matmul). ")
    runs = short["results"] + long["results"]
    return ("gmm forward+backward " + " / ".join(f"{r['gmm']['fwd_bwd_tflops']:.0f}" for r in runs)
            + " TFLOP/s (" + " / ".join(f"{r['shape']} {r['tokens']:,}" for r in runs) + "). ")


def kernels(short: Record, long: Record, cpu: Record) -> list[str]:
    peak = short["peak_bf16_flops"]
    shapes = [[a, b] for a in short["results"] for b in long["results"] if a["shape"] == b["shape"]]
    results = short["results"] + long["results"]
    worst = min(results, key=lambda r: r["gmm_vs_dense_tflops"])
    grads = [r["layer_grad_pallas_vs_xla_max_rel_err"] for r in results if "layer_grad_pallas_vs_xla_max_rel_err" in r]
    interpret = [r[backend] for r in cpu["results"] for backend in ("gpu", "tpu")]
    device = short["device"]
    what = (f"Pallas grouped matmul on an {device} (bf16, peak {peak / 1e12:,.0f} TFLOP/s; "
            f"`results/bench_kernels_{device.replace(' ', '_')}*.json`)")
    result = (". ".join(kernel_shape(runs, peak) for runs in shapes)
              + f". gmm / dense is lowest for {KERNEL_SHAPES.get(worst['shape'], worst['shape'])} at "
              f"{worst['tokens']:,} tokens: about {worst['rows'] / worst['E']:,.0f} rows per expert, so many "
              f"{worst['tiling'][0]}-row tiles straddle two groups. {kernel_fwd_bwd(short, long)}"
              "Compiled kernels agree with plain matmuls to "
              f"{sci(max(r['gmm_max_rel_err'] for r in results))} relative (bf16), the Pallas layer's gradients with "
              f"the XLA layer's to {sci(max(grads))}. On CPU the script records the interpret-mode correctness run "
              f"(`results/bench_kernels_cpu_interpret.json`: both kernel families' forward within "
              f"{sci(max(r['fwd_max_abs_err'] for r in interpret))} absolute and gradients within "
              f"{sci(max(max(r['grad_lhs_max_rel_err'], r['grad_rhs_max_rel_err']) for r in interpret))} relative of "
              "`ragged_dot`)")
    return [what, commands(command(x) for x in (short, long, cpu)), result]


def qgmm_gpu(g: Record) -> str:
    decode = [r for r in g["results"] if r["rows"] <= g["decode_rows"]]
    big = g["results"][-1]
    speed = "; ".join(
        f"{b}-bit " + " / ".join(f"{r[f'qgmm{b}']['speedup_vs_gmm']:.2f}" for r in decode)
        for b in g["bits"])
    layer = " / ".join(f"{r['speedup']:.2f}" for r in g["layer_decode"])
    return (f"On an {g['device']} at the Mixtral expert shape (E={g['E']}, d={g['d']}, f={g['f']}, group size "
            f"{g['group_size']}): qgmm / gmm speed-up at {' / '.join(str(r['rows']) for r in decode)} rows {speed} "
            f"(goal > 1 at 4 bits: {'met' if g['goal_met'] else 'not met'}); at {big['rows']:,} rows "
            + " / ".join(f"{b}-bit {big[f'qgmm{b}']['speedup_vs_gmm']:.2f}x" for b in g["bits"])
            + f"; the 4-bit dropless layer {layer}x the bf16 layer's speed at "
            f"{' / '.join(str(r['tokens']) for r in g['layer_decode'])} tokens. ")


def qgmm(cpu: Record) -> list[str]:
    gpu = sorted(cpu.results.glob("bench_qgmm_*.json"))  # one file per GPU it was timed on
    gpu = [load(cpu.results, p.stem) for p in gpu if p.stem != "bench_qgmm_cpu_interpret"]
    rows = cpu["results"]
    what = "Quantized grouped matmul (`qgmm`, experts read as stored) vs the bf16 grouped matmul"
    timed = "".join(qgmm_gpu(g) for g in gpu) or "Not timed yet: it needs a GPU. "
    result = (timed + f"In Pallas interpret mode (`results/bench_qgmm_cpu_interpret.json`) the GPU kernel equals "
              f"the float grouped matmul on the dequantized weights at {and_join(sorted({str(r['bits']) for r in rows}))} "
              f"bits, balanced and Zipf-skewed groups: forward within {sci(max(r['fwd_max_rel_err'] for r in rows))} "
              f"and input gradient within {sci(max(r['grad_lhs_max_rel_err'] for r in rows))} relative")
    return [what, code(command(cpu)), result]


def learned_merges(d: Record) -> list[str]:
    what = f"learned merges of the merging benchmark at the `{d['preset']}` size ({d['parameters'] / 1e6:.1f}M parameters)"
    methods = d["methods"]
    def one(m, r):
        steps = " + ".join(str(n) for n in r["paper_steps"].values())
        step_s = " / ".join(f"{p['mean']:.2f}" for p in r["step_s"].values())
        return (f"{m} {r['projected_minutes']['mean']:.1f} min ({ci(r['projected_minutes'], '{:.1f}')}; {steps} steps "
                f"of {step_s} s)")

    each = "; ".join(one(m, r) for m, r in methods.items())
    met = [m for m, r in methods.items() if r["goal_met"]]
    verdict = (f"goal (at most {d['goal_minutes']:.0f} min each) met by {and_join(met)} only" if met and len(met) < len(methods)
               else "goal met by every method" if met else f"no method meets the goal (at most {d['goal_minutes']:.0f} min)")
    result = (f"projected wall time on {d['machine']}, at the papers' step counts, mean and 95% interval over "
              f"{len(d['seeds'])} seeds of random weights and inputs: {each}. {verdict} "
              f"(`results/bench_learned_merges_{d['preset']}.json`)")
    return [what, code(command(d)), result]


def vs_transformers(d: Record) -> list[str]:
    kinds = {"block": "MoE block", "model": "whole model forward"}
    groups: dict[str, list[str]] = {}
    for r in d["rows"]:
        kind, model = r["case"].split("/")
        groups.setdefault(kind, []).append(f"{MODELS.get(model, model)} {r['ratio']:.2f}")
    ratios = "; ".join(f"{kinds.get(kind, kind)} {', '.join(v)}" for kind, v in groups.items())
    ratio = [r["ratio"] for r in d["rows"]]
    slower = sum(x > 1 for x in ratio)
    verdict = "jmoe faster in every case" if not slower else f"jmoe slower in {slower} of {len(ratio)} cases"
    what = (f"jmoe vs transformers {d['transformers']} (torch {d['torch']}) on the same weights, {d['threads']} "
            f"threads, {int(flag(d, 'tokens')):,} tokens")
    result = (f"time ratio jmoe / transformers: {ratios}; worst {max(ratio):.2f}: {verdict}. The dropless loop runs "
              "at XLA's dense-FFN speed for the same FLOPs; the model gains from `hf.load` putting weights on the "
              "device once (before, NumPy leaves were copied on every call) and from blockwise causal attention on CPU")
    return [what, code(command(d)), result]


def decode_model(name: str, m: Record) -> str:
    s = m["shapes"]
    shared = s["num_shared_experts"]
    extra = f", {shared} shared expert{'s' if shared > 1 else ''}" if shared else ""
    return (f"{m['params_total'] / 1e6:.0f}M-parameter {MODELS.get(name, name)} ({s['attention'].upper()}, "
            f"E={s['num_experts']}, k={s['top_k']}{extra})")


def decode_goal(cases: list[Record], goal: str) -> str:
    m = re.search(r">=\s*([0-9.]+)x", goal)
    if m is None:
        raise ValueError(f"bench_decode.json: unreadable goal {goal!r}")
    parts = []
    for batch in sorted({c["batch"] for c in cases}):
        at = [c for c in cases if c["batch"] == batch]
        met = [c["model"] for c in at if c["decode_ratio_jmoe_over_transformers"] >= float(m.group(1))]
        parts.append(f"met at batch {batch}" if len(met) == len(at) else f"not met at batch {batch}" if not met
                     else f"met at batch {batch} for {', '.join(met)} only")
    return f"goal ({goal}): {', '.join(parts)}"


def decode_agreement(cases: list[Record]) -> str:
    keys = ("jmoe_vs_transformers_static", "jmoe_vs_transformers_dynamic")
    pairs = [(n, c["agreement"]["of"]["transformers"]) for c in cases for key in keys for n in c["agreement"][key]]
    if all(n == total for n, total in pairs):
        return "greedy tokens identical to transformers' in every case"
    return f"greedy tokens agree with transformers' for at least the first {min(pairs)[0]} of {pairs[0][1]} tokens"


def decode(d: Record) -> list[str]:
    cases, models = d["cases"], d["models"]
    impls = ", ".join(code(i) for i in dict.fromkeys(m["transformers_experts_implementation"] for m in models.values()))
    what = (f"KV-cached generation vs transformers {d['transformers']} `generate` (greedy, its faster cache; its "
            f"experts run with {impls}) and jmoe's previous window-recompute sampler, same random weights, "
            f"{' and '.join(decode_model(n, m) for n, m in models.items())} models, {d['prompt_tokens']}-token "
            f"prompts, {d['new_tokens']} new tokens, {d['threads']} threads")
    ratios = ", ".join(f"{c['model']}/B={c['batch']} {c['decode_ratio_jmoe_over_transformers']:.2f}" for c in cases)
    window = ", ".join(f"{c['decode_ratio_jmoe_over_window']:.0f}x" for c in cases)
    result = (f"decode tokens/s ratio jmoe / transformers: {ratios}; {decode_goal(cases, d['goal'])}. The engine "
              "serves experts as separate arrays on CPU (`ExpertList`): XLA:CPU no longer copies each expert's slice, "
              "but its small matmuls still run below torch's bandwidth, which bounds batch "
              f"{max(c['batch'] for c in cases)}, where nearly every expert is read each step. vs the window path "
              f"{window}; {decode_agreement(cases)} (`results/bench_decode.json`)")
    return [what, code(command(d)), result]


def decode_dispatch(d: Record) -> list[str]:
    res = d["results"]
    rows = [(r["shape"], row) for r in res for row in r["rows"]]

    def at(shape, row):
        return f"E={shape['num_experts']}, k={shape['top_k']}, T={row['tokens']}"

    gather = min(rows, key=lambda x: x[1]["gather_over_dropless"])
    dropless = max(rows, key=lambda x: x[1]["gather_over_dropless"])
    worst = max(rows, key=lambda x: x[1]["choice_over_best"])
    g, dl = 1 / gather[1]["gather_over_dropless"], dropless[1]["gather_over_dropless"]
    if g > 1 and dl > 1:
        wins = (f"neither wins everywhere: gather up to {g:.1f}x faster ({at(*gather)}), dropless up to {dl:.1f}x "
                f"faster ({at(*dropless)})")
    else:
        wins = f"{'gather' if g > 1 else 'dropless'} is faster everywhere"
    slots = d["threshold"]["decode_dispatch_slots_per_expert"]
    rule = "T*k <= E" if slots == 1 else f"T*k <= {slots:g} E"

    def shape(key):
        return "/".join(str(v) for v in sorted({r["shape"][key] for r in res}))

    tokens = [row["tokens"] for _, row in rows]
    what = (f"decode-time MoE dispatch: `gather` (each slot reads only its expert) vs dropless with the engine's small "
            f"chunks, T = {min(tokens)}..{max(tokens)} tokens, E={shape('num_experts')}, k={shape('top_k')}, "
            f"d={shape('d_model')}")
    result = (f"{wins}; the rule {rule} (gather, else dropless) stays within "
              f"{d['threshold']['worst_choice_over_best']:.2f}x of the faster at every shape (worst at "
              f"{at(*worst)}) (`results/bench_decode_dispatch.json`)")
    return [what, code(command(d["meta"])), result]


def decode_moe(d: Record) -> list[str]:
    chunks = d["chunks"]
    models = list(dict.fromkeys(c["model"] for c in chunks))
    smallest = min(chunks, key=lambda c: c["d_ff"])["model"] if len(models) > 1 else None

    def model(name):
        rows = sorted((c for c in chunks if c["model"] == name), key=lambda c: c["tokens"])
        first, rest = rows[0], rows[1:]
        text = (f"{MODELS.get(name, name)} E={first['num_experts']}, k={first['top_k']}, d_ff={first['d_ff']} "
                f"{first['split_over_best_stacked']:.2f}x at T={first['tokens']}")
        if rest:
            text += (f" and {span([c['split_over_best_stacked'] for c in rest])}x at T={rest[0]['tokens']}.."
                     f"{rest[-1]['tokens']}")
        return text + (" (small experts: the per-chunk cost dominates the copy)" if name == smallest else "")

    tokens = [c["tokens"] for c in chunks]
    what = (f"a decoding step's MoE layer on {d['backend'].upper()}: the dropless loop on stacked experts vs on the "
            "`ExpertList` layout (E separate arrays picked by `lax.switch`), forward, "
            f"T = {min(tokens)}..{max(tokens)} tokens")
    result = (f"time of the split layout over the faster stacked dispatch (dropless or gather): "
              f"{'; '.join(model(m) for m in models)} (`results/bench_decode_moe.json`)")
    return [what, code(command(d)), result]


def merge(d: Record) -> list[str]:
    names = {"task_arithmetic": "task arithmetic", "ties": "TIES"}
    rows = {r["name"]: r for r in d["rows"]}
    merges = [r for r in d["rows"] if r["name"] != "read"]
    times = ", ".join(f"{names.get(r['name'], r['name'])} {r['seconds']:.1f} s ({r['ratio_to_read']:.2f}x"
                      f"{' the read time' if i == 0 else ''})" for i, r in enumerate(merges))
    rss = [r["rss_vs_model"] for r in merges]
    below = "met" if max(rss) < 1 else "not met"
    what = (f"out-of-core `jmoe merge` of {d['input_gb'] / d['model_gb']:.0f} checkpoints of {d['model_gb']:.1f} GB, "
            "page cache evicted before each measurement")
    result = (f"reading the {d['input_gb']:.1f} GB of inputs: {rows['read']['seconds']:.1f} s; {times}; peak RSS "
              f"{span([r['peak_rss_gb'] for r in merges])} GB = {span(rss)}x one model (goal below one model: {below})")
    return [what, code(command(d)), result]


def offload_best_policies(per_seed: list[Record], cache: int) -> str:
    best = []
    for r in per_seed:
        hit = r["caches"]["hit_rate"]
        i = r["caches"]["sizes"].index(cache)
        best.append(max((p for p in hit if p != "belady"), key=lambda p: hit[p][i]))
    return ", ".join(f"{p} for {n} seed{'s' if n > 1 else ''}" for p, n in Counter(best).most_common())


def offload_recall_by_layer(per_seed: list[Record]) -> str:
    layers = [r["predict"]["gate"]["1"] for r in per_seed]
    first = next(i for i, x in enumerate(layers[0]) if x is not None)
    last = len(layers[0]) - 1
    return (f"{span([x[first] for x in layers])} at MoE layer {first + 1}, {span([x[last] for x in layers])} at "
            f"layer {last + 1}")


def offload_caches(s: Record, seeds: list[Record], cache: int) -> str:
    belady = sum(r["caches"]["hit_rate"]["belady"][r["caches"]["sizes"].index(cache)] for r in seeds) / len(seeds)
    gap, best = s["belady_minus_best_online_points_at_2k"], s["best_online_hit_rate_at_2k"]
    lru, lru_gate = s["lru_hit_rate_at_2k"], s["lru_gate_prefetch_hit_rate_at_2k"]
    gain = s["gate_prefetch_gain_points_at_2k"]
    return (f"best online policy ({offload_best_policies(seeds, cache)}) hit rate {best['mean']:.2f} (95% {ci(best)}) "
            f"against Belady's {belady:.2f}: gap {gap['mean']:.1f} points ({ci(gap, '{:.1f}')}), goal {gap['goal']}: "
            f"{goal_verdict(gap)}; the gate's prefetch lifts LRU from {lru['mean']:.2f} to {lru_gate['mean']:.2f} "
            f"({gain['mean']:+.1f} points, {ci(gain, '{:.1f}')})")


def offload_recall(s: Record, seeds: list[Record]) -> str:
    gate, learned = s["next_layer_recall_gate"], s["next_layer_recall_learned"]
    best = gate if gate["mean"] >= learned["mean"] else learned
    return (f"next-layer top-k recall: cross-layer gate {gate['mean']:.2f} ({ci(gate)}; "
            f"{offload_recall_by_layer(seeds)}), learned predictor {learned['mean']:.2f} ({ci(learned)}), goal "
            f"{best['goal']}: {goal_verdict(best)}")


def offload_speed(s: Record, gpu: bool) -> str:
    tok, speedup = s["decode_tokens_per_s"], s["offloaded_over_on_demand"]
    mb = {n: f"{b / 1e6:.3g}" for n, b in s["device_bytes"].items()}
    links = {"pcie4_x16": "PCIe 4.0 x16", "h200_host_link": "H200 host link"}
    model = and_join([f"{v['mean']:.2f}x ({links.get(n, n)})"
                      for n, v in s["time_model_offloaded_over_on_demand"].items()])
    return (f"decode{'' if gpu else ' (both tiers in host memory)'}: resident {tok['resident']['mean']:.0f} tok/s, "
            f"offloaded (lru + gate prefetch) {tok['offloaded']['mean']:.0f}, load on demand "
            f"{tok['on_demand']['mean']:.0f}; offloaded / on demand {speedup['mean']:.2f}x ({ci(speedup)}), goal "
            f"{speedup['goal']}: {goal_verdict(speedup)}; device memory {mb['resident']} MB resident, "
            f"{mb['offloaded']} MB offloaded, {mb['on_demand']} MB on demand; the time model gives {model}: at this "
            "size compute, not loading, dominates a token")


def offload(d: Record) -> list[str]:
    cfg, s, seeds = d["config"], d["summary"], d["per_seed"]
    first = seeds[0]
    cache, k = first["speed"]["cache_size"], first["top_k"]
    what = (f"expert offloading on trained models: trained {cfg['steps']} steps at batch {cfg['batch_size']} "
            f"(E={first['num_experts']}, k={k}, {first['moe_layers']} MoE layers), {len(cfg['seeds'])} seeds; decode "
            f"traces of {cfg['prompts']} prompts x {cfg['new_tokens']} new tokens; cache of {cache} slots per layer "
            f"({cache / k:g}k)")
    result = (f"{offload_caches(s, seeds, cache)}; {offload_recall(s, seeds)}; {offload_speed(s, cfg['gpu'])}. An "
              "under-trained small model routes less consistently than the papers' large ones (`results/offload.json`, "
              "`offload.png`)")
    return [what, code(command(d)), result]


def adapters(d: Record) -> list[str]:
    shape = d["meta"]["shape"]
    rows = {r["adapter"]: r for r in d["rows"]}
    what = (f"a fine-tuning step of adapters on a frozen SwiGLU FFN on {d['meta']['backend'].upper()} (forward + "
            f"gradient of the adapters and the input), d={shape['d_model']}, f={shape['d_ff']}, {shape['tokens']:,} "
            f"tokens, about equal trainable parameters: LoRA rank {shape['num_experts'] * shape['rank']} vs "
            f"{shape['num_experts']} experts of rank {shape['rank']}")
    others = ", ".join(f"{n} {rows[n]['ratio_to_lora']:.2f}x ({rows[n]['ratio_min']:.2f}-{rows[n]['ratio_max']:.2f})"
                       for n in ("mixlora", "smora", "dynmole", "frozen") if n in rows)
    memory = ", ".join(f"{n} {rows[n]['memory_ratio_to_lora']:.2f}x" for n in ("mixlora", "smora", "dynmole")
                       if n in rows and rows[n]["memory_ratio_to_lora"] is not None)
    why = (": the chunked loop's backward, which recomputes each chunk and scatters the gradient of its wide rows "
           "(every expert's x A, x W_gate and x W_up), costs more than plain LoRA's extra matmuls"
           if not d["goal_met"] else "")
    result = (f"step time over plain LoRA's (median and range of per-round ratios): {others}; scratch memory {memory}. "
              f"{d['verdict']}{why} (`results/bench_adapters.json`)")
    return [what, code(command(d["meta"])), result]


def devices(results: Path, prefix: str, *not_devices: str) -> list[str]:
    """The devices with a `<prefix>_<device>.json` in `results` (a benchmark timed on each
    accelerator it ran on), but for `not_devices` (e.g. a CPU run that only checks the script)."""
    names = (p.stem[len(prefix) + 1:] for p in results.glob(f"{prefix}_*.json"))
    return sorted(d for d in names if d not in not_devices)


def train_mfu(d: Record) -> list[str]:
    m = d["model"]
    what = (f"a whole training step of the `{d['preset']}` preset on an {d['device']} (bf16 compute, "
            f"{d['batch']} x {d['seq_len']:,} tokens, {d['active_params'] / 1e6:,.0f}M of "
            f"{d['total_params'] / 1e6:,.0f}M parameters active: E={m['moe']['num_experts']}, k={m['moe']['top_k']})")
    lo, hi = d["step_s_range"]
    mfu = (f"MFU {d['mfu']:.1%} of the data sheet's bf16 peak ({d['peak_bf16_flops'] / 1e12:,.0f} TFLOP/s)"
           if d["mfu"] is not None else "no data-sheet peak known for this device")
    result = (f"{d['step_s'] * 1e3:,.1f} ms per step ({lo * 1e3:,.1f}-{hi * 1e3:,.1f} over {d['steps_timed']} steps), "
              f"{d['tokens_per_s']:,.0f} tokens/s, {d['model_flops_per_step'] / d['step_s'] / 1e12:,.0f} model "
              f"TFLOP/s: {mfu}, {d['mfu_vs_matmul']:.1%} of a bf16 8192^3 matmul measured on the same chip "
              f"({d['matmul_tflops']:,.0f} TFLOP/s); MaxText publishes {d['maxtext_mixtral_mfu']:.1%} for "
              f"Mixtral-8x7B on TPU v5p; losses finite: {'yes' if d['losses_finite'] else 'NO'}")
    return [what, code(command(d)), result]


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def decode_gpu(d: Record) -> list[str]:
    what = (f"KV-cached decoding of a Mixtral-shaped bf16 model (random weights, as many layers as fit: "
            f"{d['n_layers']}, {gb(d['weights_bytes'])}) on an {d['device_kind']}")

    def case(c):
        share = (f" = {c['bandwidth_share']:.1%} of its {c['device_bytes_per_s'] / 1e12:.2f} TB/s"
                 if c["bandwidth_share"] is not None else " (no data-sheet bandwidth for this device)")
        return (f"batch {c['batch']}: decode {c['decode_tokens_per_s']:,.1f} tokens/s ({c['decode_step_s'] * 1e3:.2f} ms "
                f"per step reading {gb(c['bytes_per_step']['total'])}: {c['achieved_bytes_per_s'] / 1e9:,.0f} GB/s"
                f"{share}), prefill {c['prefill_tokens_per_s']:,.0f} tokens/s")

    one = [c for c in d["cases"] if c["batch"] == 1 and c["bandwidth_share"] is not None]
    goal = (f"goal at batch 1 (at least 60% of the HBM bandwidth): {'met' if one[0]['bandwidth_share'] >= 0.6 else 'NOT met'}"
            if one else "goal at batch 1 not judged (no batch-1 case with a bandwidth share)")
    result = "; ".join(case(c) for c in d["cases"]) + f". {goal} (`results/bench_decode_gpu.json`)"
    return [what, code(command(d)), result]


def offload_gpu(d: Record) -> list[str]:
    n = "offloaded"
    what = (f"expert offloading on an {d['device']}: a Mixtral-shaped bf16 model ({d['layers']} layers, "
            f"{gb(d['experts_total_bytes'])} of experts in pinned host memory), {d['cache_size']} expert slots per "
            "layer on the device, LRU with gate prefetch, vs loading each token's experts on demand")
    t, dev, st = d["median_tokens_per_s"], d["device_bytes"], d["offload"]
    result = (f"decode {t[n]:.2f} tokens/s vs {t['on_demand']:.2f} on demand ({d['speedup_vs_on_demand']:.2f}x); "
              f"device memory {gb(dev[n])} vs {gb(dev['on_demand'])}; decoding hit rate "
              f"{st[n]['decode_hit_rate']:.2f}, {gb(st[n]['decode_bytes_per_token'])} moved per token vs "
              f"{gb(st['on_demand']['decode_bytes_per_token'])} (`results/offload_gpu.json`)")
    return [what, code(command(d)), result]


ROWS = (  # renderer, results files it reads (or results folder -> one tuple of files per row), what it
    # measures, the commands that write the files
    (before_after, ("bench_before_after",), "the layer and the expert-parallel layer before and after a change",
     ("python experiments/bench_before_after.py --base REV",)),
    (grad_accum, ("bench_grad_accum",), "gradient accumulation with a global-scope balance loss",
     ("python experiments/bench_grad_accum.py",)),
    (moe_layer, ("bench_moe_layer",), "MoE layer vs the dense limit (one FFN over T*k tokens)",
     ("python experiments/bench_moe_layer.py",)),
    (expert_parallel, ("bench_expert_parallel",), "expert-parallel bytes moved per token",
     ("python experiments/bench_expert_parallel.py",)),
    (rebalance, ("bench_rebalance",), "expert-parallel steps with and without re-placing the experts",
     ("python experiments/bench_rebalance.py",)),
    (rebalance_train, ("bench_rebalance_train",), "training with and without rebalancing on a skewed model",
     ("python experiments/bench_rebalance_train.py",)),
    (fssdp, ("bench_fssdp",), "FSSDP vs expert parallelism: bytes per step", ("python experiments/bench_fssdp.py",)),
    (kernels, lambda results: [(f"bench_kernels_{d}", f"bench_kernels_{d}_tokens32768", "bench_kernels_cpu_interpret")
                               for d in devices(results, "bench_kernels", "cpu_interpret")
                               if not d.endswith("_tokens32768")],
     "Pallas grouped matmul on a GPU",
     ("python experiments/bench_kernels.py", "python experiments/bench_kernels.py --tokens 32768")),
    (train_mfu, lambda results: [(f"bench_train_mfu_{d}",) for d in devices(results, "bench_train_mfu", "cpu")],
     "a training step of the `base` preset on one GPU and its MFU", ("python experiments/bench_train_mfu.py",)),
    (qgmm, ("bench_qgmm_cpu_interpret",), "quantized grouped matmul vs bf16 gmm",
     ("python experiments/bench_qgmm.py",)),
    (learned_merges, ("bench_learned_merges_small",), "learned merges' wall time at the `small` size",
     ("python experiments/bench_learned_merges.py",)),
    (vs_transformers, ("bench_vs_transformers",), "jmoe vs transformers on the same weights",
     ("python experiments/bench_vs_transformers.py",)),
    (decode, ("bench_decode",), "KV-cached generation vs transformers `generate`",
     ("python experiments/bench_decode.py",)),
    (decode_gpu, ("bench_decode_gpu",), "KV-cached decoding of a Mixtral-shaped model on one GPU: share of HBM bandwidth",
     ("python experiments/bench_decode.py --gpu",)),
    (decode_dispatch, ("bench_decode_dispatch",), "decode-time MoE dispatch: `gather` vs dropless",
     ("python experiments/bench_decode_dispatch.py",)),
    (decode_moe, ("bench_decode_moe",), "a decoding step's MoE layer: stacked experts vs the `ExpertList` layout",
     ("python experiments/bench_decode_moe.py --only chunks",)),
    (merge, ("bench_merge",), "out-of-core `jmoe merge`", ("python experiments/bench_merge.py",)),
    (offload, ("offload",), "expert offloading on trained models", ("python experiments/offload.py",)),
    (offload_gpu, ("offload_gpu",), "expert offloading of a Mixtral-shaped model on one GPU",
     ("python experiments/offload.py --gpu",)),
    (adapters, ("bench_adapters",), "fine-tuning step of LoRA, MixLoRA, SMoRA and DynMoLE adapters",
     ("python experiments/bench_adapters.py",)),
)


def speed(results: Path) -> str:
    """The "Speed and memory" table: one row per benchmark (per device where its files are per
    device), in the order of ROWS."""
    rows = []
    for render, files, what, cmds in ROWS:
        sets = files(results) if callable(files) else [files]
        present = [fs for fs in sets if all((results / f"{f}.json").exists() for f in fs)]
        rows += [render(*(load(results, f) for f in fs)) for fs in present]
        if not present:
            rows.append([what, commands(cmds), f"not measured yet (run {commands(cmds)})"])
    return table(["what", "command", "result"], rows)
