"""`jmoe trace`, `jmoe trace-report` and `jmoe cache-sim`: record a routing trace of a model on
a text, and the routing locality and expert-cache hit rates of a routing trace file
(`jmoe.infer.trace`). Everything is checked before any work; bad input is one ValueError
line and nothing is written.

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
    if size > trace.num_experts:
        raise ValueError(f"--cache-size {size} exceeds the trace's {trace.num_experts} experts per layer "
                         f"(trace {args.trace})")
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


def check_new_file(path, flag: str, force: bool = True) -> Path:
    """A file to be written: its directory exists and it is not a directory (nor, unless
    `force`, an existing file)."""
    if not path:
        raise ValueError(f"{flag} is empty")
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {p} is a directory")
    if p.exists() and not force:
        raise ValueError(f"{flag} {p} exists (--force replaces it)")
    if not p.parent.is_dir():
        raise ValueError(f"{flag} {p}: directory {p.parent} does not exist")
    return p


def read_text_file(path, flag: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{flag} {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{flag} {p} is empty")
    return text


def trace_text(model, ids: list[int], seq_len: int, batch_size: int, progress: bool = False):
    """Record the routing of token ids `ids`, cut into sequences of `seq_len` tokens run
    `batch_size` at a time (prefill, teacher forced) -> RoutingTrace (sequence ids 0, 1, ...)."""
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jmoe.infer.forward import prefill
    from jmoe.infer.trace import recorder_for
    from jmoe.progress import Progress

    cfg = model.cfg
    rec = recorder_for(cfg)
    seqs = [ids[a: a + seq_len] for a in range(0, len(ids), seq_len)]
    run = jax.jit(partial(prefill, cfg=cfg, max_len=seq_len, with_routing=True))
    bar = Progress(len(seqs), enabled=progress, every=1, warmup=1)
    for lo in range(0, len(seqs), batch_size):
        batch = seqs[lo: lo + batch_size]
        tokens = np.zeros((batch_size, seq_len), np.int32)
        lengths = np.ones((batch_size,), np.int32)
        for r, sq in enumerate(batch):
            tokens[r, : len(sq)] = sq
            lengths[r] = len(sq)
        _, _, routing = run(model.params, model.state, jnp.asarray(tokens), jnp.asarray(lengths))
        keep = (np.arange(seq_len)[None, :] < lengths[:, None]) & (np.arange(batch_size) < len(batch))[:, None]
        rec.add(jax.device_get(routing), keep, np.arange(lo, lo + batch_size))
        bar.update(min(lo + batch_size, len(seqs)), {"tokens": f"{rec.num_tokens:,}"})
    bar.close()
    return rec.trace()


def run_trace(args, out=None, err=None) -> int:
    """`jmoe trace`: the routing of --data's tokens under --ckpt's model, written to --out."""
    from jmoe.infer.load import open_model
    from jmoe.infer.predict import trace_gate_accuracy

    out = out or sys.stdout
    err = err or sys.stderr
    dest = check_new_file(args.out, "--out", force=getattr(args, "force", False))
    text = read_text_file(args.data, "--data")
    source = open_model(args.ckpt, step=args.step)
    cfg = source.cfg
    if not cfg.moe_layers:
        raise ValueError(f"{args.ckpt} has no MoE layers to trace")
    seq_len = args.seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context of {cfg.max_seq_len} tokens")
    ids = source.tokenizer.encode(text)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    if not ids:
        raise ValueError(f"--data {args.data} has no tokens")
    model = source.load()
    trace = trace_text(model, ids, seq_len, args.batch_size, progress=not args.quiet)
    trace.save(dest)
    acc = [a for a in trace_gate_accuracy(trace) if a is not None]
    gate = f"; cross-layer gate top-k recall {sum(acc) / len(acc):.3f}" if acc else ""
    out.write(f"wrote {dest}: {trace.num_tokens} tokens in {trace.num_sequences} sequences, {trace.num_layers} MoE "
              f"layers, top-{trace.top_k} of {trace.num_experts} experts{gate}\n")
    out.flush()
    return 0
