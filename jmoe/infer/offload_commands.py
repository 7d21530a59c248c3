"""`jmoe trace-report` and `jmoe cache-sim`: routing locality and expert-cache hit rates of a
routing trace file (`jmoe.infer.trace`). Everything is checked before any work; bad input is
one ValueError line and nothing is written.

The command-line arguments these functions read:

    jmoe trace-report
      trace               positional, str: "routing trace (.npz, format jmoe-routing-trace)"
      --out               str, required: "directory for report.json and report.png, or a path
                          ending in .json (the figure goes next to it, as .png)"
      --segment-lengths   int, nargs="+", default [4, 16, 64, 256]: "segment lengths (tokens)
                          of SRP and SCH (default 4 16 64 256)"
      --cache-size        int, default None: "cached experts per layer for SCH (default 2 x top-k)"
      --reuse-bins        int, default 32: "bins of the reuse-distance histograms (default 32)"
      --no-plot           store_true: "write report.json only"

    jmoe cache-sim
      trace               positional, str: "routing trace (.npz, format jmoe-routing-trace)"
      --cache-size        int, required: "expert slots per layer (at least the trace's top-k)"
      --policy            str, default "lru", choices CACHE_POLICIES.names():
                          "replacement policy: lru | lfu | score | arc | belady (default lru)"
      --prefetch          choices ("none", "oracle"), default "none": "oracle: load each
                          token's true experts before it (the upper bound of a predictor)"
      --json              store_true: "print one JSON object instead of text"
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jmoe.infer import cachesim, locality
from jmoe.infer.trace import load


def _positive(value, flag: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    return value


def _out_paths(out) -> tuple[Path, Path]:
    """(report.json path, report.png path) of --out, checked without creating anything."""
    if not out:
        raise ValueError("--out is empty")
    p = Path(out)
    if p.suffix.lower() == ".json":
        if p.is_dir():
            raise ValueError(f"--out {p} is a directory, not a .json path")
        if not p.parent.is_dir():
            raise ValueError(f"--out {p}: directory {p.parent} does not exist")
        return p, p.with_suffix(".png")
    if p.exists() and not p.is_dir():
        raise ValueError(f"--out {p} exists and is not a directory (give a directory or a .json path)")
    if not p.exists():
        parent = p.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(f"--out {p}: {parent} is not a directory")
    return p / "report.json", p / "report.png"


def run_trace_report(args, out=None) -> int:
    """Write report.json (and report.png unless args.no_plot) for args.trace; print where.
    Returns the exit code (0)."""
    out = out or sys.stdout
    ms = list(getattr(args, "segment_lengths", None) or locality.DEFAULT_SEGMENT_LENGTHS)
    for m in ms:
        _positive(m, "--segment-lengths")
    if len(set(ms)) != len(ms):
        raise ValueError(f"--segment-lengths has repeated values: {ms}")
    cache_size = getattr(args, "cache_size", None)
    if cache_size is not None:
        _positive(cache_size, "--cache-size")
    bins = _positive(getattr(args, "reuse_bins", 32), "--reuse-bins")
    json_path, png_path = _out_paths(args.out)
    trace = load(args.trace)
    rep = locality.report(trace, ms, cache_size=cache_size, reuse_bins=bins)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    locality.save_report(rep, json_path)
    written = [str(json_path)]
    if not getattr(args, "no_plot", False):
        locality.plot_report(rep, png_path)
        written.append(str(png_path))
    out.write(f"wrote {' and '.join(written)}\n")
    out.flush()
    return 0


def run_cache_sim(args, out=None) -> int:
    """Simulate args.policy with args.cache_size slots per layer over args.trace; print the
    result as JSON ({policy, cache_size, hit_rate, per_layer, requests, hits, loads, ...}) with
    args.json, else as text. Returns the exit code (0)."""
    out = out or sys.stdout
    size = _positive(args.cache_size, "--cache-size")
    policy = getattr(args, "policy", "lru")
    cachesim.CACHE_POLICIES.get(policy)
    mode = getattr(args, "prefetch", None) or "none"
    if mode not in ("none", "oracle"):
        raise ValueError(f"--prefetch must be none or oracle, got {mode!r}")
    trace = load(args.trace)
    if size < trace.top_k:
        raise ValueError(f"cache size {size} is smaller than top-k {trace.top_k}: the experts a token needs "
                         f"at one layer must all fit in the cache at once (trace {args.trace})")
    prefetch = cachesim.oracle_prefetch(trace) if mode == "oracle" else None
    res = cachesim.simulate(trace, size, policy, prefetch).to_dict()
    if getattr(args, "json", False):
        out.write(json.dumps(res) + "\n")
    else:
        rate = "n/a" if res["hit_rate"] is None else f"{res['hit_rate']:.4f}"
        out.write(f"{policy}, {size} experts per layer: hit rate {rate} ({res['hits']} of {res['requests']} "
                  f"requests), {res['loads']} loads, {res['evictions']} evictions")
        if mode != "none":
            out.write(f", {res['prefetch_loads']} prefetch loads ({res['useful_prefetches']} useful)")
        out.write("\n")
        per = ", ".join("n/a" if x is None else f"{x:.3f}" for x in res["per_layer"])
        out.write(f"per layer: {per}\n")
    out.flush()
    return 0
