"""`jmoe generate`: text from a jmoe run or a Hugging Face model directory.

Everything the command is given is checked before the weights are read: the directory,
its tokenizer (and chat template with --chat), the prompts against the model's context and
vocabulary, and the sampling flags.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jmoe.infer.contrast import SelfContrast
from jmoe.infer.engine import prepare_prompts
from jmoe.infer.load import encode_prompt, open_model, select_experts
from jmoe.infer.offload import format_bytes
from jmoe.infer.offload_commands import check_new_file
from jmoe.infer.sampling import SamplingParams
from jmoe.infer.trace import recorder_for
from jmoe.nn.task_head import as_task

OFFLOAD_FLAGS = ("expert_cache", "expert_memory", "predictor_trace", "expert_store_path")


def offload_options(args, cfg) -> dict | None:
    """The offloading flags of `jmoe generate`, checked against the model's config (before its
    weights are read) -> OffloadedEngine keyword arguments, or None without --offload-experts."""
    import jax

    from jmoe.infer.offload import cache_size_for_memory, parse_bytes
    from jmoe.nn.transformer import init_lm

    if not getattr(args, "offload_experts", False):
        given = [f for f in OFFLOAD_FLAGS if getattr(args, f, None) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --offload-experts")
        return None
    layers = list(cfg.moe_layers)
    if not layers:
        raise ValueError(f"--offload-experts: {args.ckpt} has no MoE layers")
    k = max(cfg.moe_for(i).top_k for i in layers)
    E = min(cfg.moe_for(i).num_experts for i in layers)
    if args.expert_memory is not None:
        shapes = jax.eval_shape(lambda: init_lm(jax.random.key(0), cfg))
        size = cache_size_for_memory(cfg, shapes, parse_bytes(args.expert_memory))
    else:
        size = args.expert_cache if args.expert_cache is not None else min(2 * k, E)
        if size < k:
            raise ValueError(f"--expert-cache {size} is smaller than top-k {k}: a token's experts must fit at once")
        if size > E:
            raise ValueError(f"--expert-cache {size} exceeds the {E} experts of a MoE layer")
    policy, prefetch = args.cache_policy, args.prefetch
    if policy == "none":
        prefetch = "none"
    predictor = None
    if prefetch == "learned":
        from jmoe.infer.predict import LearnedPredictor
        from jmoe.infer.trace import load

        if args.predictor_trace is None:
            raise ValueError("--prefetch learned needs --predictor-trace (a routing trace of this model: jmoe trace)")
        trace = load(args.predictor_trace)
        if trace.num_layers != len(layers) or trace.num_experts != max(cfg.moe_for(i).num_experts for i in layers):
            raise ValueError(f"--predictor-trace {args.predictor_trace} has {trace.num_layers} MoE layers of "
                             f"{trace.num_experts} experts; the model has {len(layers)} of {E}")
        if len(layers) < 2:
            raise ValueError("--prefetch learned needs a model of at least 2 MoE layers")
        predictor = LearnedPredictor.fit(trace)
    elif args.predictor_trace is not None:
        raise ValueError("--predictor-trace is for --prefetch learned")
    path = None
    if args.expert_store == "disk":
        if args.expert_store_path is None:
            raise ValueError("--expert-store disk needs --expert-store-path FILE (a safetensors file to write)")
        path = check_new_file(args.expert_store_path, "--expert-store-path")
        try:
            import safetensors  # noqa: F401
        except ImportError:
            raise ValueError("--expert-store disk reads safetensors files: install jmoe's interop extra") from None
    elif args.expert_store_path is not None:
        raise ValueError("--expert-store-path is for --expert-store disk")
    return {"cache_size": size, "policy": policy, "prefetch": prefetch, "predictor": predictor,
            "tier": args.expert_store, "path": path}


def contrast_from_args(args, cfg):
    """The `SelfContrast` of --self-contrast and its parameters, checked against the model's
    config (before its weights are read); None without --self-contrast."""
    ranks = getattr(args, "self_contrast", None)
    if ranks is None:
        for flag in ("contrast_alpha", "contrast_beta"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --self-contrast")
        return None
    try:
        parsed = [int(r) for r in ranks.split(",")]
    except ValueError:
        raise ValueError(f"--self-contrast {ranks!r} must be comma-separated ranks, e.g. 1 or 1,2") from None
    given = {k: v for k, v in (("alpha", args.contrast_alpha), ("beta", args.contrast_beta)) if v is not None}
    try:
        contrast = SelfContrast(ranks=tuple(parsed), **given)
        contrast.weak_config(cfg)
    except ValueError as e:
        raise ValueError(f"--self-contrast: {e}") from None
    return contrast


def steered_config(args, source):
    """The model's config with the expert steering of --steer-experts (RICE), checked before
    its weights are read (source: the `ModelSource`); its own config without the flag."""
    cfg, pairs = source.cfg, getattr(args, "steer_experts", None)
    if pairs is None:
        if getattr(args, "steer_factor", None) is not None:
            raise ValueError("--steer-factor needs --steer-experts")
        return cfg
    if source.task_experts is not None and getattr(args, "expert_subset", None) != "all":
        raise ValueError("--steer-experts names experts of the whole model; a PreMoe run keeps a task's experts "
                         "only (add --expert-subset all)")
    from jmoe.routing.steer import steer_config

    try:
        parsed = [tuple(int(x) for x in pair.split(":")) for pair in pairs.split(",")]
        if any(len(p) != 2 for p in parsed):
            raise ValueError
    except ValueError:
        raise ValueError(f"--steer-experts {pairs!r} must be layer:expert pairs, e.g. 1:3,2:0") from None
    factor = args.steer_factor if args.steer_factor is not None else 64.0
    try:
        return steer_config(cfg, parsed, factor)
    except ValueError as e:
        raise ValueError(f"--steer-experts: {e}") from None


def router_options(args) -> dict | None:
    """The --router-option (key, value) pairs as one dict (later ones win), or None."""
    pairs = getattr(args, "router_option", None)
    return dict(pairs) if pairs else None


def task_config(args, cfg, source: str):
    """cfg running as the task of --task (its task head's output for that task), checked
    before the weights are read; cfg itself without the flag."""
    name = getattr(args, "task", None)
    if name is None:
        return cfg
    try:
        return as_task(cfg, name, source)
    except ValueError as e:
        raise ValueError(f"--task: {e}") from None


def mowst_options(args, *, offload, contrast, trace) -> dict | None:
    """{"threshold": --mowst-threshold or None} with --mowst, checked before the weights are read
    (a Mowst run, decoding with nothing that changes the model's steps); None without it."""
    if not getattr(args, "mowst", False):
        if getattr(args, "mowst_threshold", None) is not None:
            raise ValueError("--mowst-threshold needs --mowst")
        return None
    from jmoe.train.mowst import read_mowst_config

    read_mowst_config(args.ckpt)
    for given, flag in ((offload, "--offload-experts"), (contrast, "--self-contrast"), (trace, "--trace")):
        if given is not None:
            raise ValueError(f"--mowst cannot be combined with {flag}")
    return {"threshold": args.mowst_threshold}


def offloaded_engine(model, offload: dict, batch_size: int):
    from jmoe.infer.offload import OffloadedEngine

    return OffloadedEngine(model.cfg, model.params, model.state, batch_size=batch_size, **offload)


def read_lines(path, flag: str) -> list[str]:
    """The prompts of a UTF-8 file, one a line (blank lines skipped); ValueError naming flag."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path} " + ("is a directory, not a file" if path.is_dir() else "does not exist"))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{flag} {path} has no prompts (one a line)")
    return prompts


def read_prompts(args) -> list[str]:
    """The prompts of --prompt or --prompts-file (one a line; blank lines skipped)."""
    if args.prompts_file is None:
        if args.prompt == "":
            raise ValueError("--prompt is empty")
        return [args.prompt]
    return read_lines(args.prompts_file, "--prompts-file")


def run_generate(args, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    prompts = read_prompts(args)
    if args.stream and len(prompts) > 1:
        raise ValueError(f"--stream prints one prompt's tokens as they come; {args.prompts_file} has {len(prompts)} "
                         "prompts (use --json for several)")
    if args.stream and args.json:
        raise ValueError("--stream and --json cannot be combined")
    if args.min_p >= 1.0:
        raise ValueError(f"argument --min-p: {args.min_p} must be < 1")
    source = open_model(args.ckpt, step=args.step, skip_ratio=getattr(args, "skip_ratio", None),
                        router_options=router_options(args))
    cfg = source.cfg
    if args.top_k > cfg.vocab_size:
        raise ValueError(f"--top-k {args.top_k} exceeds the model's vocabulary of {cfg.vocab_size} tokens "
                         "(0 samples from all of them)")
    for s in args.stop_id or ():
        if s >= cfg.vocab_size:
            raise ValueError(f"--stop-id {s} is outside the model's vocabulary of {cfg.vocab_size} tokens")
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty)
    tok = source.tokenizer
    ids = prepare_prompts([encode_prompt(tok, p, chat=args.chat) for p in prompts], cfg, args.max_new_tokens,
                          truncate=args.truncate)
    stop_ids = [*(() if args.ignore_eos else tok.eos_ids), *(args.stop_id or ())]
    trace_path = check_new_file(args.trace, "--trace") if getattr(args, "trace", None) else None
    if trace_path is not None and not cfg.moe_layers:
        raise ValueError(f"--trace: {args.ckpt} has no MoE layers to trace")
    offload = offload_options(args, cfg)
    steered = task_config(args, steered_config(args, source), args.ckpt)
    if steered.task_head is not None and steered.task_head.task is None and not args.quiet:
        err.write(f"{args.ckpt} has a task head over {', '.join(steered.task_head.tasks)}; without --task it runs as "
                  "the model it was trained on\n")
    contrast = contrast_from_args(args, steered)
    if contrast is not None and offload is not None:
        raise ValueError("--self-contrast runs the model twice per token in memory; it cannot be combined with "
                         "--offload-experts")
    mowst = mowst_options(args, offload=offload, contrast=contrast, trace=trace_path)
    subset = getattr(args, "expert_subset", None)
    source.check_subset(subset)

    model = source.load()
    model.cfg = steered
    model, task = select_experts(model, source.task_experts, subset, ids)
    if task is not None and not args.quiet:
        m = model.cfg.moe_for(model.cfg.moe_layers[0]).num_experts
        err.write(f"PreMoe: running the experts of task {task} ({m} per MoE layer)\n")
    if args.dtype:
        model.cfg = model.cfg.replace(dtype=args.dtype)
    if mowst is not None:
        from jmoe.infer.mowst import MowstDecoder
        from jmoe.train.mowst import load_mowst

        mcfg, threshold, weak = load_mowst(args.ckpt, model.cfg.vocab_size)
        engine = MowstDecoder(model.cfg, model.params, model.state, weak, mcfg,
                              threshold if mowst["threshold"] is None else mowst["threshold"], batch_size=args.batch_size)
    elif offload is None:
        engine = model.engine(args.batch_size, contrast)
    else:
        engine = offloaded_engine(model, offload, args.batch_size)
    recorder = recorder_for(model.cfg) if trace_path is not None else None
    on_token = None
    if args.stream:
        decoder = tok.stream_decoder()
        if not args.chat:
            out.write(prompts[0])
        out.flush()

        def on_token(_index, token):
            text = decoder.push([token])
            if text:
                out.write(text)
                out.flush()

    extra = {} if mowst is not None else {"recorder": recorder}
    gens, stats = engine.generate(ids, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_ids=stop_ids,
                                  seed=args.seed, truncate=args.truncate, on_token=on_token,
                                  progress=not (args.quiet or args.stream) and len(prompts) > 1, **extra)
    if recorder is not None:
        recorder.trace().save(trace_path)
    if args.stream:
        out.write(decoder.flush() + "\n")
    for g in gens:
        text = tok.decode(g.token_ids)
        if args.json:
            out.write(json.dumps({"prompt": prompts[g.index], "text": text, "token_ids": list(g.token_ids),
                                  "finish_reason": g.finish_reason}, ensure_ascii=False) + "\n")
        elif not args.stream:
            shown = text if args.chat else prompts[g.index] + text
            out.write(shown + ("\n\n" if len(gens) > 1 and g.index < len(gens) - 1 else "\n"))
        if g.finish_reason == "context" and not args.quiet:
            err.write(f"note: prompt {g.index} filled the model's context of {cfg.max_seq_len} tokens after "
                      f"{len(g.token_ids)} new tokens\n")
    off = engine.offload_stats.to_dict() if offload is not None else None
    if args.json:
        speeds = {"prefill_tokens_per_s": stats.prefill_tokens_per_s, "decode_tokens_per_s": stats.decode_tokens_per_s,
                  "prompt_tokens": stats.prompt_tokens, "decode_tokens": stats.decode_tokens,
                  "compile_s": stats.compile_s}
        if task is not None:
            speeds["expert_subset"] = task
        if mowst is not None:
            speeds["mowst"] = {"threshold": engine.threshold, "skip_share": stats.skip_share,
                               "weak_tokens": stats.weak_tokens, "strong_calls": stats.strong_calls}
        if off is not None:
            speeds["offload"] = {**off, "cache_size": offload["cache_size"], "policy": offload["policy"],
                                 "prefetch": offload["prefetch"], "device_bytes": engine.lm.resident_bytes}
        out.write(json.dumps(speeds) + "\n")
    elif not args.quiet:
        err.write(f"{len(gens)} prompt(s): prefill {stats.prefill_tokens_per_s:,.0f} tokens/s, decode "
                  f"{stats.decode_tokens_per_s:,.0f} tokens/s (compiling took {stats.compile_s:.1f} s)\n")
        if mowst is not None:
            err.write(f"Mowst: {stats.skip_share:.1%} of the tokens came from the weak expert (threshold "
                      f"{engine.threshold}); the model ran {stats.strong_calls} times after prefill for "
                      f"{stats.decode_tokens} tokens\n")
        if off is not None:
            rate = "n/a" if off["hit_rate"] is None else f"{off['hit_rate']:.3f}"
            per_tok = "n/a" if off["bytes_per_token"] is None else format_bytes(off["bytes_per_token"])
            err.write(f"offloaded experts: {offload['cache_size']} slots per MoE layer ({offload['policy']}, prefetch "
                      f"{offload['prefetch']}), hit rate {rate}, {per_tok} loaded per token, "
                      f"{format_bytes(engine.lm.resident_bytes)} of weights on the device\n")
    if trace_path is not None and not args.quiet:
        err.write(f"wrote the routing trace {trace_path}\n")
    out.flush()
    return 0
