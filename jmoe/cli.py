"""The `jmoe` command: train, eval, generate, merge.

Exit codes: 0 success, 2 a usage or input error (one line on stderr, nothing on disk
changed), 3 the loss diverged (the last good checkpoint is kept), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_DIVERGED = 3

MAX_NEW_TOKENS = 100_000  # generate: one forward pass each
MAX_EVAL_BATCHES = 10_000


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def _int_range(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(
                f"{value} must be {f'>= {lo}' if hi is None else f'in [{lo}, {hi}]'}")
        return value

    return parse


def _int_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers."""
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    return values


def _float_range(lo: float, hi: float | None = None, *, open_lo: bool = False):
    """An argparse type: a finite number in [lo, hi] ((lo, hi] with open_lo)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        bad_lo = value <= lo if open_lo else value < lo
        if not math.isfinite(value) or bad_lo or (hi is not None and value > hi):
            bound = f"> {lo}" if open_lo else f">= {lo}"
            raise argparse.ArgumentTypeError(
                f"{text} must be a finite number {bound}" + (f" and <= {hi}" if hi is not None else ""))
        return value

    return parse


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _apply_moe(moe, changes: dict, options: dict[str, dict], source: str = "--set"):
    """`moe` with plain field `changes` applied first (a new router, dispatch or balance loss
    starts from its default options), then the options of the methods named in `options`."""
    if changes:
        moe = moe.replace(**changes)
    for name, opts in options.items():
        try:
            moe = moe.with_options(name, **opts)
        except ValueError as e:
            raise ValueError(f"{source} moe.{name}.*: {e}") from None
    return moe


def _apply_overrides(model_cfg, tc, overrides: list[str]):
    """Apply `--set section.field=value` overrides (sections: model, moe, train) and
    `--set moe.<method>.<option>=value` for the options of the layer's router, dispatch or
    balance loss."""
    model_changes, moe_changes, train_changes = {}, {}, {}
    moe_options: dict[str, dict] = {}
    sections = {"model": model_changes, "moe": moe_changes, "train": train_changes}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ValueError(f"--set {item!r} must look like section.field=value (sections: model, moe, train)")
        section = parts[0]
        if section not in sections:
            raise ValueError(f"--set {item!r}: unknown section {section!r} (use model, moe or train)")
        if section == "moe" and len(parts) == 3:
            moe_options.setdefault(parts[1], {})[parts[2]] = _parse_value(value)
        elif len(parts) == 2:
            sections[section][parts[1]] = _parse_value(value)
        else:
            raise ValueError(f"--set {item!r} must look like section.field=value or moe.<method>.<option>=value")
    if model_cfg.moe is not None and "d_model" in model_changes:
        moe_changes.setdefault("d_model", model_changes["d_model"])  # the MoE layers follow the model width
    if moe_changes or moe_options:
        if model_cfg.moe is None:
            raise ValueError("--set moe.*: the model has no MoE layers (--dense)")
    try:
        if moe_changes or moe_options:
            model_changes["moe"] = _apply_moe(model_cfg.moe, moe_changes, moe_options)
        if model_changes:
            model_cfg = model_cfg.replace(**model_changes)
        if train_changes:
            tc = tc.replace(**train_changes)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        # the configs name the field in their errors; a value of a shape they did not expect
        # can fail deeper, so then the error names the --set items
        fields = [item.partition("=")[0].rsplit(".", 1)[-1] for item in overrides]
        text = str(e) or type(e).__name__
        if isinstance(e, ValueError) and any(f in text for f in fields):
            raise
        raise ValueError(f"--set {' '.join(overrides)}: {text}") from None
    return model_cfg, tc


def _build_train_configs(args):
    from jmoe.nn.presets import preset
    from jmoe.train import rundir
    from jmoe.train.config import TrainConfig

    out = Path(args.out or f"runs/{args.preset or 'tiny'}")
    if args.resume and rundir.is_run_dir(out):
        model_cfg, tc, _ = rundir.read_config(out)
        if args.preset is not None:
            p = preset(args.preset)
            if p["model"] != model_cfg and not args.dense:
                raise ValueError(f"cannot resume: --preset {args.preset} differs from the run in {out}")
    elif args.resume_from:
        if args.preset is not None:
            raise ValueError("--resume-from takes the model of that run; it conflicts with --preset")
        source = Path(args.resume_from)
        try:
            model_cfg, tc, _ = rundir.read_config(source)
        except ValueError as e:
            raise ValueError(f"--resume-from: {e}") from None
        tc = tc.replace(init_from=str(source.absolute()), distill_from=None)
    else:
        p = preset(args.preset or "tiny")
        model_cfg, tc = p["model"], TrainConfig(**p["train"])

    moe_changes = {
        k: v
        for k, v in {"router": args.router, "dispatch": args.dispatch, "num_experts": args.num_experts,
                     "top_k": args.top_k}.items()
        if v is not None
    }
    moe_options = {}
    if args.impl is not None:
        moe_options["dropless"] = {"impl": args.impl}
    if args.capacity_factor is not None:
        moe_options["capacity"] = {"capacity_factor": args.capacity_factor}
    if args.dense:
        given = sorted(moe_changes) + [f"{m}.{o}" for m, opts in moe_options.items() for o in opts]
        if given:
            raise ValueError(f"--dense conflicts with MoE options: {', '.join(given)}")
        if model_cfg.moe is not None:
            model_cfg = model_cfg.replace(moe=None)
    elif moe_changes or moe_options:
        if model_cfg.moe is None:
            raise ValueError("this model has no MoE layers")
        flags = {"dropless": "--impl", "capacity": "--capacity-factor"}
        moe = _apply_moe(model_cfg.moe, moe_changes, {})
        for name, opts in moe_options.items():
            moe = _apply_moe(moe, {}, {name: opts}, source=flags[name])
        model_cfg = model_cfg.replace(moe=moe)
    train_changes = {
        k: v
        for k, v in {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "seed": args.seed,
            "data": _train_data(args),
            "eval_every": args.eval_every,
            "ckpt_every": args.ckpt_every,
            "keep_ckpts": args.keep_ckpts,
            "mesh": args.mesh,
            "ep_impl": args.ep_impl,
            "fssdp_experts": args.fssdp_experts,
            "distill_from": None if args.distill_from is None else str(Path(args.distill_from).absolute()),
            "distill_weight": args.distill_weight,
            "distill_temperature": args.distill_temperature,
            "train_only": args.train_only,
            "placement": None if args.placement is None else str(Path(args.placement).absolute()),
            "rebalance_every": args.rebalance_every,
            "rebalance_method": args.rebalance_method,
            "redundant_experts": args.redundant_experts,
        }.items()
        if v is not None
    }
    if train_changes:
        tc = tc.replace(**train_changes)
    model_cfg, tc = _apply_overrides(model_cfg, tc, args.set or [])
    if tc.seq_len > model_cfg.max_seq_len and not args.resume:
        model_cfg = model_cfg.replace(max_seq_len=tc.seq_len)
    return model_cfg, tc, out


def _train_data(args) -> str | None:
    """--data, or the task mixture of --tasks/--task-mix (a "tasks:..." data spec)."""
    tasks, mix = getattr(args, "tasks", None), getattr(args, "task_mix", None)
    if mix is not None and tasks is None:
        raise ValueError("--task-mix needs --tasks")
    if tasks is None:
        return args.data
    if args.data is not None:
        raise ValueError("--tasks and --data both name the training text; give one")
    from jmoe.evals.mixture import mix_spec

    return mix_spec(tasks, mix)


def cmd_evaluate(args) -> int:
    from jmoe import evals
    from jmoe.infer.command import contrast_from_args, router_options, steered_config
    from jmoe.infer.load import open_model, select_experts
    from jmoe.merge.experts.premoe import query_sequences

    tasks = evals.resolve_tasks(args.tasks)
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():
        raise ValueError(f"--out {out}: directory {out.parent} does not exist")
    if out is not None and out.is_dir():
        raise ValueError(f"--out {out} is a directory; name the JSON file to write")
    # config and tokenizer checked before the weights load
    source = open_model(args.ckpt, step=args.step, skip_ratio=args.skip_ratio, router_options=router_options(args))
    source.check_subset(args.expert_subset)
    steered = steered_config(args, source)
    contrast = contrast_from_args(args, steered)
    model = source.load()
    model.cfg = steered
    results, subsets = [], []
    for task in tasks:
        # a PreMoe run keeps one task's experts: named, or retrieved from the task's prompts
        prompts = query_sequences(task, model.tokenizer, args.split, seed=args.seed, max_len=model.cfg.max_seq_len) \
            if source.task_experts is not None and args.expert_subset in (None, "auto") else ()
        chosen, subset = select_experts(model, source.task_experts, args.expert_subset, prompts)
        if chosen.cfg.task_head is not None and task.name in chosen.cfg.task_head.tasks:
            chosen = chosen.for_task(task.name)  # the task's own output of the model's task head
        results += evals.evaluate(chosen, [task], examples=args.examples, max_windows=args.max_windows,
                                  split=args.split, seed=args.seed, batch_size=args.batch_size, contrast=contrast)
        subsets.append(subset)
    record = {"ckpt": str(args.ckpt), "step": model.step, "split": args.split, "seed": args.seed,
              **({"self_contrast": contrast.to_dict()} if contrast is not None else {}),
              **({"steer_experts": args.steer_experts} if args.steer_experts else {}),
              "results": [r.to_dict() | ({"expert_subset": s} if s is not None else {}) for r, s in zip(results, subsets)]}
    if out is not None:
        from jmoe.train.metrics import atomic_write_text

        atomic_write_text(out, json.dumps(record, indent=1))
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"{'task':<12} {'metric':<14} {'value':>8}  {'95% interval':<17} {'n':>5}")
    for r, subset in zip(results, subsets):
        note = f"  (experts of {subset})" if subset is not None else ""
        print(f"{r.task:<12} {r.metric:<14} {r.value:>8.4f}  [{r.ci95[0]:.4f}, {r.ci95[1]:.4f}] {r.n:>5}{note}")
    if out is not None:
        print(f"wrote {out}")
    return 0


def cmd_train(args) -> int:
    from jmoe.train.trainer import train

    _check_runtime_args(args)
    model_cfg, tc, out = _build_train_configs(args)
    _start_runtime(args)
    train(
        model_cfg, tc, out, resume=args.resume, stop_after=args.stop_after,
        progress=not args.quiet, log=lambda m: print(m, flush=True),
    )
    return 0


def _run_to_read(args):
    """(model config, train config) of the run --ckpt, with --step checked to name a complete
    checkpoint (by default it has one); nothing is loaded yet."""
    from jmoe.nn.transformer import LMConfig
    from jmoe.train import rundir
    from jmoe.train.config import TrainConfig

    saved, _ = rundir.find_checkpoint(args.ckpt, args.step)
    return LMConfig.from_dict(saved["model"]), TrainConfig.from_dict(saved["train"])


def cmd_eval(args) -> int:
    from jmoe.data import eval_batches, load_corpus
    from jmoe.train.trainer import evaluate, load_run

    from jmoe.infer.command import router_options
    from jmoe.infer.load import with_router_options

    run_cfg, tc = _run_to_read(args)
    if args.skip_ratio is not None and not run_cfg.moe_layers:
        raise ValueError(f"--skip-ratio: {args.ckpt} has no MoE layers whose experts could be skipped")
    with_router_options(run_cfg, router_options(args))  # checked before any work
    corpus = load_corpus(args.data if args.data is not None else tc.data)
    from jmoe.train.finetune import corpus_for

    corpus = corpus_for(corpus, args.ckpt)  # the ids the run reads (its tokenizer's, or bytes)
    batches = eval_batches(corpus.val, args.batches, tc.batch_size, tc.seq_len)
    model_cfg, tc, params, router_state, saved, step = load_run(args.ckpt, args.step)
    if args.skip_ratio is not None:
        model_cfg = model_cfg.with_moe(skip_ratio=args.skip_ratio)
    model_cfg = with_router_options(model_cfg, router_options(args))
    if args.data is None and corpus.sha256 != saved.get("data", {}).get("sha256"):
        print("note: the corpus on this machine differs from the one the run was trained on", file=sys.stderr)
    ev = evaluate(params, router_state, model_cfg, batches)
    ev["val_bpb"] /= corpus.bytes_per_token
    result = {"run": str(args.ckpt), "step": step, "data": corpus.source, **ev}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"run {args.ckpt} at step {step} on {corpus.source}")
    unit = "byte" if corpus.tokenizer is None else "token"
    print(f"validation loss {ev['val_loss']:.4f} nats/{unit}, {ev['val_bpb']:.4f} bits/byte")
    for li, (layer, load) in enumerate(zip(model_cfg.moe_layers, ev["load"])):
        cells = " ".join(f"{x:.3f}" for x in load)
        print(f"layer {layer} expert load: {cells}  (MaxVio {max(load) * len(load) - 1:.2f})")
    if "skip_rate" in ev:
        per_layer = ", ".join(f"{x:.3f}" for x in ev["skipped"])
        print(f"online expert skipping: {ev['skip_rate']:.1%} of expert slots skipped (per layer {per_layer})")
    return 0


def cmd_generate(args) -> int:
    from jmoe.infer.command import run_generate

    return run_generate(args)


def cmd_trace(args) -> int:
    from jmoe.infer.offload_commands import run_trace

    return run_trace(args)


def _router_option(text: str) -> tuple:
    """KEY=VALUE -> (key, the value read as a YAML scalar: numbers, booleans, strings)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} must be KEY=VALUE")
    try:
        parsed = yaml.safe_load(value) if value.strip() else value
    except yaml.YAMLError:
        parsed = None
    if isinstance(parsed, (list, dict)) or (parsed is None and value.strip()):
        raise argparse.ArgumentTypeError(f"{text!r}: the value must be a number, a boolean or a word")
    return key.strip(), parsed


def _add_expert_selection_args(p, subset: bool = True) -> None:
    """--skip-ratio (online expert skipping) and, for commands that run PreMoe runs, --expert-subset."""
    p.add_argument("--skip-ratio", type=_float_range(0.0, 1.0), metavar="R",
                   help="online expert skipping: a token skips each expert whose routing weight is below R times "
                        "its largest one (MC-MoE), in [0, 1] (default: the model's setting)")
    p.add_argument("--router-option", type=_router_option, action="append", metavar="KEY=VALUE",
                   help="run with this option of the router instead of the model's (repeatable; e.g. THOR's "
                        "inference=ensemble: each layer the mean of every expert)")
    if subset:
        p.add_argument("--expert-subset", metavar="auto|all|TASK",
                       help="a PreMoe run (jmoe compress --method premoe): run a task's experts only; auto (default) "
                            "retrieves the task nearest to the prompts, all runs every expert")


def _add_steer_args(p) -> None:
    s = p.add_argument_group("expert steering (RICE)")
    s.add_argument("--steer-experts", metavar="L:E,...",
                   help="reinforce these experts (model layer:expert, comma-separated; jmoe steer finds them): their "
                        "routing weight is multiplied by --steer-factor wherever the router selects them")
    s.add_argument("--steer-factor", type=_float_range(0.0, open_lo=True), metavar="F",
                   help="the multiplier, > 0 (default 64); the token's weights keep their total")


def _add_contrast_args(p) -> None:
    c = p.add_argument_group("self-contrast decoding (SCMoE)")
    c.add_argument("--self-contrast", metavar="RANKS",
                   help="contrast each token's routing with a weak one that keeps only the experts at these ranks of "
                        "its top-k (comma-separated, 0 = the top expert; e.g. 1)")
    c.add_argument("--contrast-alpha", type=_float_range(0.0, 1.0, open_lo=True), metavar="A",
                   help="plausibility cutoff in (0, 1]: tokens below A times the top probability are excluded "
                        "(default 0.1)")
    c.add_argument("--contrast-beta", type=_float_range(0.0), metavar="B",
                   help="strength of the contrast, >= 0 (default 0.5)")


def _add_offload_args(g) -> None:
    from jmoe.infer.cachesim import CACHE_POLICIES

    o = g.add_argument_group("expert offloading")
    o.add_argument("--offload-experts", action="store_true",
                   help="keep the routed experts in host memory (or on disk) and a few per MoE layer on the device")
    size = o.add_mutually_exclusive_group()
    size.add_argument("--expert-cache", type=_int_range(1), metavar="N", help="device slots per MoE layer (>= top-k)")
    size.add_argument("--expert-memory", metavar="SIZE",
                      help="device memory for expert slots over all MoE layers, e.g. 2GiB (picks --expert-cache)")
    o.add_argument("--cache-policy", default="lru",
                   choices=[n for n in CACHE_POLICIES.names() if n != "belady"] + ["none"],
                   help="replacement policy of the expert cache; none loads on demand (default lru)")
    o.add_argument("--prefetch", choices=("none", "gate", "learned"), default="gate",
                   help="load the next MoE layer's predicted experts while a layer computes (default gate)")
    o.add_argument("--predictor-trace", metavar="FILE",
                   help="routing trace to train the learned predictor on (--prefetch learned)")
    o.add_argument("--expert-store", choices=("host", "disk"), default="host",
                   help="slow tier of the experts: host memory, or a memory-mapped safetensors file (default host)")
    o.add_argument("--expert-store-path", metavar="FILE", help="the safetensors file of --expert-store disk")


def cmd_place(args) -> int:
    from jmoe.parallel.placement.command import run_place

    return run_place(args)


def cmd_trace_report(args) -> int:
    from jmoe.infer.offload_commands import run_trace_report

    return run_trace_report(args)


def cmd_cache_sim(args) -> int:
    from jmoe.infer.offload_commands import run_cache_sim

    return run_cache_sim(args)


def _add_distributed_args(p) -> None:
    p.add_argument("--cpu-devices", type=_int_range(1), metavar="N", help="simulate N CPU devices in this process")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process run: the coordinator's address")
    p.add_argument("--num-processes", type=_int_range(1), metavar="N",
                   help="multi-process run: how many processes take part (with --coordinator)")
    p.add_argument("--process-id", type=_int_range(0), metavar="I",
                   help="multi-process run: this process's index, 0 .. N-1 (with --coordinator; 0 writes the run directory)")
    p.add_argument("--distributed", action="store_true", help="multi-process run configured by the cluster environment (TPU pods, SLURM, ...)")


def _check_runtime_args(args) -> None:
    """The multi-process flags, checked before anything starts."""
    coordinator = getattr(args, "coordinator", None)
    given = [f for f, v in (("--num-processes", args.num_processes), ("--process-id", args.process_id)) if v is not None]
    if coordinator is None:
        if given:
            raise ValueError(f"{' and '.join(given)} need --coordinator HOST:PORT")
        return
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator {coordinator!r} must look like HOST:PORT")
    if args.num_processes is None or args.process_id is None:
        raise ValueError("--coordinator needs --num-processes and --process-id")
    if args.process_id >= args.num_processes:
        raise ValueError(f"--process-id {args.process_id} must be below --num-processes {args.num_processes}")


def _start_runtime(args) -> None:
    """Device simulation and jax.distributed, before JAX touches a backend."""
    from jmoe.parallel.distributed import initialize, set_cpu_device_count

    if getattr(args, "cpu_devices", None):
        set_cpu_device_count(args.cpu_devices)
    coordinator = getattr(args, "coordinator", None)
    if coordinator or getattr(args, "distributed", False):
        initialize(coordinator, args.num_processes, args.process_id)


def cmd_merge(args) -> int:
    from jmoe.io.safetensors import parse_size
    from jmoe.merge.checkpoints import run_merge
    from jmoe.merge.mergekit import parse_config
    from jmoe.merge.staging import check_output_dir

    config = Path(args.config)
    if not config.exists():
        raise ValueError(f"merge configuration {str(config)!r} does not exist")
    parse_size(args.max_shard_size)
    plan = parse_config(config)
    search_flags = [f for f, v in (("--tasks", args.tasks), ("--search-evals", args.search_evals), ("--sigma", args.sigma),
                                   ("--popsize", args.popsize)) if v is not None]
    if search_flags and not args.search:
        raise ValueError(f"{', '.join(search_flags)} only apply with --search")
    if args.search:
        return _merge_search(args, config, plan)
    out = check_output_dir(args.out_dir, flag="OUT_DIR", force=args.force, force_flag="--force")
    run_merge(plan, out, max_shard_size=args.max_shard_size, seed=args.seed, progress=not args.quiet,
              log=lambda m: print(m, flush=True))
    return 0


def _merge_search(args, config: Path, plan) -> int:
    import yaml

    from jmoe import evals
    from jmoe.infer.load import open_model
    from jmoe.merge.search import evaluator, knobs, search
    from jmoe.merge.staging import check_output_dir

    if not args.tasks:
        raise ValueError("--search needs --tasks (the evaluation suite's tasks to score candidates on)")
    tasks = evals.resolve_tasks(args.tasks)
    if not knobs(plan.raw):
        raise ValueError(f"{config}: the configuration has no numeric parameters to search")
    # the merged models must be readable as models with a tokenizer: checked on the first input
    ref = open_model(plan.model_dirs()[0])
    if ref.tokenizer is None:
        raise ValueError(f"{plan.model_dirs()[0]} has no tokenizer: --search scores merges on text tasks")
    out = check_output_dir(args.out_dir, flag="OUT_DIR", force=args.force, force_flag="--force")
    result = search(config, out, evaluate=evaluator(tasks, examples=args.examples, max_windows=args.max_windows,
                                                     seed=args.seed),
                    max_evals=40 if args.search_evals is None else args.search_evals,
                    sigma=0.2 if args.sigma is None else args.sigma, popsize=args.popsize, seed=args.seed,
                    merge_seed=args.seed, max_shard_size=args.max_shard_size, log=(lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr,
                                                                                                   flush=True)))
    print(yaml.safe_dump(result["best"], sort_keys=False), end="")
    return 0


def cmd_moe_build(args) -> int:
    from jmoe.merge.moe_build import build_moe

    from jmoe.merge.moe_build import upcycle_plan

    config = args.config
    if args.partition is not None:
        from jmoe.merge.moe_build import partition_run

        if args.upcycle is not None or args.noise_scale is not None:
            raise ValueError(f"--partition cannot be combined with {'--upcycle' if args.upcycle else '--noise-scale'}")
        partition_run(config, args.out_dir, num_experts=args.partition, top_k=2 if args.top_k is None else args.top_k,
                      force=args.force, log=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)))
        return 0
    if args.upcycle is not None:
        config = upcycle_plan(args.config, args.upcycle, top_k=2 if args.top_k is None else args.top_k,
                              noise_scale=args.noise_scale or 0.0)
    else:
        given = [f for f, v in (("--top-k", args.top_k), ("--noise-scale", args.noise_scale)) if v is not None]
        if given:
            raise ValueError(f"{given[0]} goes with --upcycle or --partition (a configuration sets experts_per_token "
                             "and noise_scale)")
    build_moe(config, args.out_dir, force=args.force, seed=args.seed, allow_identical=args.allow_identical,
              log=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)))
    return 0


def cmd_unlearn(args) -> int:
    from jmoe.editing.run import unlearn_run

    unlearn_run(args.ckpt, args.out, forget=args.forget, retain=args.retain, method=args.method, scope=args.scope,
                steps=args.steps, lr=args.lr, alpha=args.alpha, retain_weight=args.retain_weight, npo_beta=args.npo_beta,
                batches=args.batches, step=args.step, seed=args.seed,
                log=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)))
    return 0


def cmd_compressed_experts(args) -> int:
    from jmoe.editing.compressed import compressed_run

    compressed_run(args.ckpt, args.out, num_compressed=args.compressed, step=args.step,
                   log=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)))
    return 0


def cmd_mowst(args) -> int:
    from jmoe.nn.mowst import MowstConfig
    from jmoe.train.mowst import mowst_run

    mowst_run(args.ckpt, args.out, mcfg=MowstConfig(window=args.window, hidden=args.hidden), rounds=args.rounds,
              weak_steps=args.weak_steps, strong_steps=args.strong_steps, lr=args.lr, strong_lr=args.strong_lr,
              threshold=args.threshold, step=args.step, seed=args.seed,
              log=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)))
    return 0


def cmd_task_head(args) -> int:
    from jmoe.train.task_head import task_head_run

    task_head_run(args.ckpt, args.out, tasks=args.tasks, kind=args.head, hidden=args.hidden, experts=args.experts,
                  steps=args.steps, lr=args.lr, rows=args.rows, eval_batches=args.eval_batches, step=args.step,
                  seed=args.seed, log=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)))
    return 0


def cmd_steer(args) -> int:
    from jmoe.editing.steer import expert_npmi, top_experts
    from jmoe.infer.command import read_lines
    from jmoe.infer.load import open_model

    positive, negative = read_lines(args.positive, "--positive"), read_lines(args.negative, "--negative")
    source = open_model(args.ckpt, step=args.step)
    if not source.cfg.moe_layers:
        raise ValueError(f"--ckpt {args.ckpt} has no MoE layers whose experts could be steered")
    size = sum(source.cfg.moe_for(i).num_ffn_choices for i in source.cfg.moe_layers)
    if args.top > size:
        raise ValueError(f"--top {args.top} exceeds the model's {size} routed experts")
    tok, context = source.tokenizer, source.cfg.max_seq_len
    if tok is None:
        raise ValueError(f"--ckpt {args.ckpt} has no tokenizer to read the prompts with")

    def encode(lines, flag):
        ids = [tok.encode(x, add_special_tokens=False) for x in lines]
        if not all(ids):
            raise ValueError(f"{flag}: a prompt encodes to no tokens")
        long = [i for i, x in enumerate(ids) if len(x) > context]
        if long and not args.truncate:
            raise ValueError(f"{flag}: prompt {long[0] + 1} has {len(ids[long[0]])} tokens, more than the model's "
                             f"context of {context} (--truncate keeps the last {context})")
        return [x[-context:] for x in ids]

    positive, negative = encode(positive, "--positive"), encode(negative, "--negative")
    model = source.load()
    npmi = expert_npmi(model.cfg, model.params, positive, negative, state=model.state or None)
    top = top_experts(model.cfg, npmi, args.top)
    flag = ",".join(f"{layer}:{e}" for layer, e, _ in top)
    if args.json:
        print(json.dumps({"experts": [{"layer": layer, "expert": e, "npmi": v} for layer, e, v in top],
                          "steer_experts": flag, "npmi": npmi.tolist()}))
        return 0
    print(f"{'layer':>5} {'expert':>6} {'nPMI':>7}")
    for layer, e, v in top:
        print(f"{layer:>5} {e:>6} {v:>7.3f}")
    print(f"steer with: jmoe generate --ckpt {args.ckpt} --steer-experts {flag}")
    return 0


def cmd_compress(args) -> int:
    from jmoe.merge.experts.run import compress_run

    log = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    premoe_flags = {"--experts-per-layer": args.experts_per_layer, "--tasks": args.tasks}
    if args.method == "premoe":
        from jmoe.merge.experts.premoe import premoe_run

        given = [f for f, v in {"--target-experts": args.target_experts, "--rank": args.rank, "--sparsity": args.sparsity,
                                "--budget": args.budget, "--importance": args.importance, "--router": args.router,
                                "--align": args.align, "--stats": args.stats, "--calib-data": args.calib_data}.items()
                 if v is not None]
        if given:
            raise ValueError(f"{given[0]} does not apply to --method premoe")
        missing = [f for f, v in premoe_flags.items() if v is None]
        if missing:
            raise ValueError(f"--method premoe needs {' and '.join(missing)}")
        premoe_run(args.ckpt, args.out, experts_per_layer=args.experts_per_layer, tasks=args.tasks,
                   examples=args.examples, step=args.step, seed=args.seed, log=log)
        return 0
    given = [f for f, v in premoe_flags.items() if v is not None]
    if given:
        raise ValueError(f"{given[0]} belongs to --method premoe, not {args.method}")
    if args.target_experts is None:
        raise ValueError(f"--method {args.method} needs --target-experts")
    compress_run(
        args.ckpt, args.out, method=args.method, target_experts=args.target_experts, rank=args.rank,
        sparsity=args.sparsity, budget=args.budget, importance=args.importance, router=args.router,
        align=args.align, calib_batches=args.calib_batches,
        calib_data=args.calib_data, stats=args.stats, step=args.step, seed=args.seed, log=log,
    )
    return 0


def cmd_quantize(args) -> int:
    from jmoe.quant.run import quantize_run

    quantize_run(args.ckpt, args.out, method=args.method, bits=args.bits, avg_bits=args.avg_bits,
                 group_size=args.group_size, candidates=args.candidates, per_layer=not args.global_budget,
                 skip_ratio=args.skip_ratio, calib_batches=args.calib_batches, calib_data=args.calib_data,
                 step=args.step, seed=args.seed, log=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)))
    return 0


FINETUNE_DEFAULTS = dict(steps=200, batch_size=16, seq_len=128, lr=1e-3, warmup_steps=20, weight_decay=0.0,
                         eval_every=50, ckpt_every=50)


def _names(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated names ("none" for none)."""
    return () if text.strip() == "none" else tuple(t.strip() for t in text.split(",") if t.strip())


def _build_finetune_configs(args):
    """(model config with the adapter, train config, out) of `jmoe finetune`; with --resume,
    those of the run in --out."""
    from jmoe.adapters import AdapterConfig
    from jmoe.registry import ADAPTERS
    from jmoe.train import finetune, rundir
    from jmoe.train.config import TrainConfig

    out = Path(args.out)
    if args.resume and rundir.is_run_dir(out):
        model_cfg, tc, _ = rundir.read_config(out)
        if not tc.base_from:
            raise ValueError(f"{out} is not a fine-tuning run; continue it with jmoe train --resume")
        if Path(tc.base_from) != Path(args.ckpt).absolute():
            raise ValueError(f"cannot resume: {out} fine-tunes {tc.base_from}, not {args.ckpt}")
        return model_cfg, tc, out
    uses = ADAPTERS.get(args.adapter).uses
    given = [flag for field, flag, value in (("num_experts", "--experts", args.experts), ("top_k", "--top-k", args.top_k))
             if field not in uses and value is not None]
    if given:
        raise ValueError(f"--adapter {args.adapter} takes no {' or '.join(given)}")
    base = finetune.base_config(args.ckpt)
    adapter = dict(kind=args.adapter, num_experts=args.experts, top_k=args.top_k, rank=args.rank, alpha=args.alpha,
                   ffn_targets=args.targets, attn_targets=args.attn_targets, layers=args.layers, dropout=args.dropout,
                   moe_mode=args.moe_mode)
    options = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or section != "adapter" or not name:
            raise ValueError(f"--set {item!r} must look like adapter.<option>=value")
        options[name] = _parse_value(value)
    model_cfg = base.replace(adapter=AdapterConfig(**{k: v for k, v in adapter.items() if v is not None},
                                                   options=options or None))
    train = {**FINETUNE_DEFAULTS, "seq_len": min(FINETUNE_DEFAULTS["seq_len"], model_cfg.max_seq_len)}
    given = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
             "seed": args.seed, "data": _train_data(args), "eval_every": args.eval_every,
             "ckpt_every": args.ckpt_every}
    train.update({k: v for k, v in given.items() if v is not None})
    return model_cfg, TrainConfig(**train, base_from=str(Path(args.ckpt).absolute())), out


def cmd_finetune(args) -> int:
    from jmoe.train.trainer import train

    model_cfg, tc, out = _build_finetune_configs(args)
    train(model_cfg, tc, out, resume=args.resume, stop_after=args.stop_after, progress=not args.quiet,
          log=lambda m: print(m, flush=True))
    return 0


def cmd_extract_lora(args) -> int:
    from jmoe.io.safetensors import SafetensorsError, load_safetensors
    from jmoe.merge.extract_lora import extract_lora, write_adapter
    from jmoe.merge.staging import check_output_dir, staged_dir
    from jmoe.progress import Progress

    if args.rank < 1:
        raise ValueError(f"--rank {args.rank} must be at least 1")
    models = {}
    for flag, path in (("FINETUNED", args.finetuned), ("BASE", args.base)):
        if not Path(path).is_dir():
            raise ValueError(f"{flag} {path!r} is not a directory")
        try:
            models[flag] = load_safetensors(path)
        except SafetensorsError as e:
            raise ValueError(f"{flag}: {e}") from None
    out = check_output_dir(args.out, flag="OUT", force=args.force, force_flag="--force")
    total = len(models["FINETUNED"])
    bar = Progress(total, enabled=not args.quiet, every=max(1, total // 20))
    done = iter(range(1, total + 1))
    try:
        tensors, config, report = extract_lora(models["FINETUNED"], models["BASE"], rank=args.rank,
                                               skip_undecomposable=args.skip_undecomposable,
                                               on_tensor=lambda name: bar.update(next(done), {"tensor": name}))
    finally:
        bar.close()
    with staged_dir(out) as tmp:
        write_adapter(tmp, tensors, config, report, Path(args.finetuned).absolute(), Path(args.base).absolute())
    if report["rows_truncated"]:
        print(f"note: the fine-tune's extra rows of {', '.join(report['rows_truncated'])} are not in the adapter "
              "(the base has fewer)", file=sys.stderr)
    if report["not_in_adapter"]:
        print(f"note: {len(report['not_in_adapter'])} tensors are not in the adapter (not module weights, or "
              f"--skip-undecomposable): {', '.join(report['not_in_adapter'][:5])}"
              f"{' ...' if len(report['not_in_adapter']) > 5 else ''}", file=sys.stderr)
    if not args.quiet:
        print(f"wrote {out}: rank-{report['rank']} LoRA of {report['matrices']} matrices, "
              f"{report['adapter_params']:,} parameters ({len(report['saved_whole'])} saved whole)")
    return 0


def cmd_merge_lora(args) -> int:
    from jmoe.train.finetune import export_merged

    export_merged(args.ckpt, args.out, step=args.step, force=args.force,
                  log=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)))
    return 0


def cmd_plan(args) -> int:
    from jmoe.nn.presets import preset
    from jmoe.parallel.plan import plan_run
    from jmoe.train.config import TrainConfig
    from jmoe.train import rebalance
    from jmoe.train.state import abstract_train_state

    p = preset(args.preset)
    model_cfg, tc = _apply_overrides(p["model"], TrainConfig(**p["train"]), args.set or [])
    tc = tc.replace(mesh=args.mesh)  # an expert placement is made for the planned mesh
    state = rebalance.held_layout(abstract_train_state(model_cfg, tc), tc)  # placed experts in their slots
    plan = plan_run(model_cfg, tc, args.mesh, hosts=args.hosts, devices_per_host=args.devices_per_host, state=state)
    if args.json:
        print(json.dumps({"mesh": plan.mesh, "hosts": plan.hosts, "devices_per_host": plan.devices_per_host,
                          "tokens_per_device": plan.tokens_device, "params_total_bytes": plan.params_total,
                          "device_bytes": {"params": plan.params_device, "optimizer": plan.opt_device,
                                           "gradients": plan.grads_device, "activations": plan.activations_device,
                                           "ep_buffers": plan.ep_buffers_device, "total": plan.device_total},
                          "leaves": [{"path": l[0], "shape": l[1], "spec": [list(e) if isinstance(e, tuple) else e for e in l[2]],
                                      "per_device": l[3], "dtype": l[4]} for l in plan.leaves]}))
    else:
        print(f"preset {args.preset}: {model_cfg.num_params() / 1e6:,.0f}M parameters "
              f"({model_cfg.num_params(active=True) / 1e6:,.0f}M active), batch {tc.batch_size} x {tc.seq_len} tokens, "
              f"grad_accum {tc.grad_accum}")
        print(plan.report(device_memory_gib=args.device_memory_gib))
    if args.device_memory_gib and plan.device_total > args.device_memory_gib * 1024**3:
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jmoe", description="Sparse Mixture-of-Experts in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train an MoE language model (default: tiny preset, embedded corpus)")
    t.add_argument("--preset", help="tiny | small | base (default tiny)")
    t.add_argument("--steps", type=int, help="optimizer steps of the whole run (sets train.steps)")
    t.add_argument("--batch-size", type=int, help="sequences per step (sets train.batch_size)")
    t.add_argument("--seq-len", type=int, help="tokens (bytes) per sequence (sets train.seq_len)")
    t.add_argument("--out", help="run directory (default runs/<preset>); one process writes it at a time")
    t.add_argument("--router", help="router name, e.g. topk (sets moe.router)")
    t.add_argument("--dispatch", help="dropless | capacity | dense (sets moe.dispatch)")
    t.add_argument("--impl", help="dropless implementation: auto | xla | ragged_dot | pallas (sets moe.dropless.impl)")
    t.add_argument("--num-experts", type=int, help="routed experts per MoE layer (sets moe.num_experts)")
    t.add_argument("--top-k", type=int, help="experts per token (sets moe.top_k)")
    t.add_argument("--capacity-factor", type=float, help="capacity dispatch: slots per expert over the mean (sets moe.capacity.capacity_factor; needs --dispatch capacity)")
    t.add_argument("--dense", action="store_true", help="dense FFN baseline (no MoE layers)")
    t.add_argument("--lr", type=float, help="peak learning rate of AdamW (sets train.lr)")
    t.add_argument("--seed", type=int, help="seed of the parameters, batches and routing noise (sets train.seed)")
    t.add_argument("--data", help="text file or directory (default: the embedded stdlib corpus)")
    t.add_argument("--tasks", metavar="NAMES", help="train on a mixture of evaluation tasks instead (comma-separated "
                   "names of jmoe.evals, e.g. addition,reversal,prose)")
    t.add_argument("--task-mix", metavar="WEIGHTS", help="the tasks' weights in the mixture, comma-separated in --tasks "
                   "order (default: equal)")
    t.add_argument("--eval-every", type=int, metavar="N", help="validate every N steps (sets train.eval_every)")
    t.add_argument("--ckpt-every", type=int, metavar="N", help="checkpoint every N steps (sets train.ckpt_every)")
    t.add_argument("--keep-ckpts", type=int, metavar="N", help="keep the newest N checkpoints (sets train.keep_ckpts)")
    t.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override any config field (model., moe., train.), or an option of the layer's router, dispatch or balance loss: moe.<method>.<option>")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--resume-from", metavar="DIR", help="start from the model of another run (e.g. one written by 'jmoe compress'), with a fresh optimizer")
    t.add_argument("--train-only", type=_names, metavar="NAMES", help="train only the parameters under these keys "
                   "of the parameter tree, e.g. router (the router-only fine-tune of a built MoE); the rest stays as it is")
    t.add_argument("--distill-from", metavar="DIR", help="distil from this run's model (knowledge distillation)")
    t.add_argument("--distill-weight", type=float, help="weight of the distillation loss (default 0.5)")
    t.add_argument("--distill-temperature", type=float, help="softmax temperature of distillation (default 1)")
    t.add_argument("--mesh", help='device mesh, e.g. "data=2,expert=4" (axes: data, fsdp, expert, model)')
    t.add_argument("--ep-impl", help="expert-parallel token exchange: auto | padded | ragged | allgather, or fssdp (experts sharded over every device, materialised where the tokens are)")
    t.add_argument("--fssdp-experts", type=_int_range(1), metavar="M", help="with --ep-impl fssdp: the most experts "
                   "a MoE layer gathers per step (default: all); token-slots of experts beyond them are dropped and counted")
    p = t.add_argument_group("expert placement (with --mesh ...,expert=N)")
    p.add_argument("--placement", metavar="FILE", help="run the experts on this placement (from jmoe place)")
    p.add_argument("--rebalance-every", type=_int_range(1), metavar="N",
                   help="re-place the experts every N steps from the expert loads of those steps")
    p.add_argument("--rebalance-method", metavar="NAME", help="placement method of --rebalance-every (default eplb)")
    p.add_argument("--redundant-experts", type=_int_range(0), metavar="R",
                   help="extra slots per MoE layer for replicas of hot experts (--rebalance-every; default 0)")
    _add_distributed_args(t)
    t.add_argument("--stop-after", type=_int_range(1), metavar="N", help="stop with a checkpoint after N steps in this process (resume later with --resume)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="validation loss, bits per byte and expert load of a run")
    e.add_argument("--ckpt", required=True, help="run directory (one being trained is read at its newest complete checkpoint)")
    e.add_argument("--step", type=_int_range(0), help="checkpoint step (default: latest)")
    e.add_argument("--data", help="evaluate on this text instead of the run's corpus")
    e.add_argument("--batches", type=_int_range(1, MAX_EVAL_BATCHES), default=8,
                   help=f"validation batches of the run's batch size and sequence length (1 .. {MAX_EVAL_BATCHES}; default 8)")
    _add_expert_selection_args(e, subset=False)
    e.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("evaluate", help="score a run or a Hugging Face model on evaluation tasks (exact match, "
                       "bits per byte)")
    v.add_argument("--ckpt", required=True, metavar="RUN_OR_HF_DIR", help="a jmoe run or a Hugging Face model directory")
    v.add_argument("--step", type=_int_range(0), help="a run's checkpoint step (default: latest)")
    v.add_argument("--tasks", default="all", metavar="all|NAMES", help="tasks to score (default all)")
    v.add_argument("--examples", type=_int_range(1, 100_000), default=200,
                   help="examples per algorithmic task (default 200)")
    v.add_argument("--max-windows", type=_int_range(1, 100_000), default=64,
                   help="context windows per text domain (default 64)")
    v.add_argument("--split", choices=["train", "val", "test"], default="test")
    v.add_argument("--seed", type=int, default=0, help="which examples are drawn (default 0)")
    v.add_argument("--batch-size", type=_int_range(1, 4096), default=32, help="prompts generated together")
    _add_expert_selection_args(v)
    _add_contrast_args(v)
    _add_steer_args(v)
    v.add_argument("--out", metavar="FILE", help="also write the results as JSON")
    v.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    v.set_defaults(func=cmd_evaluate)

    g = sub.add_parser("generate", help="generate text from a run or a Hugging Face model directory (KV-cached, batched)")
    g.add_argument("--ckpt", required=True, metavar="RUN_OR_HF_DIR",
                   help="a jmoe run directory (one being trained is read at its newest complete checkpoint) or a "
                        "Hugging Face model directory (config.json, safetensors, tokenizer.json)")
    g.add_argument("--step", type=_int_range(0), help="a run's checkpoint step (default: latest)")
    prompt = g.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="def ", help="text to continue (default 'def ')")
    prompt.add_argument("--prompts-file", metavar="FILE", help="prompts, one a line (blank lines skipped), generated in batches")
    g.add_argument("--chat", action="store_true", help="put each prompt in the model's chat template as the user's message")
    g.add_argument("--max-new-tokens", type=_int_range(1, MAX_NEW_TOKENS), default=200,
                   help=f"most tokens to generate per prompt (1 .. {MAX_NEW_TOKENS}; default 200; fewer when the "
                        "model's context fills up)")
    g.add_argument("--temperature", type=_float_range(0.0), default=0.8,
                   help="softmax temperature, >= 0; 0 is greedy (default 0.8)")
    g.add_argument("--top-k", type=_int_range(0), default=40,
                   help="sample among the k likeliest tokens; 0: among all (default 40)")
    g.add_argument("--top-p", type=_float_range(0.0, 1.0, open_lo=True), default=1.0,
                   help="sample among the likeliest tokens whose probabilities sum to p, in (0, 1] (default 1: off)")
    g.add_argument("--min-p", type=_float_range(0.0, 1.0), default=0.0,
                   help="drop tokens less likely than min-p times the likeliest one, in [0, 1) (default 0: off)")
    g.add_argument("--repetition-penalty", type=_float_range(0.0, open_lo=True), default=1.0,
                   help="divide the scores of tokens already seen by this, > 0 (default 1: off)")
    g.add_argument("--seed", type=_int_range(0, 2**32 - 1), default=0, help="seed of the sampling (default 0)")
    g.add_argument("--stop-id", type=_int_range(0), action="append", metavar="ID",
                   help="a token id that ends a generation (repeatable; the tokenizer's end-of-sequence ids always do)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's end-of-sequence ids")
    g.add_argument("--truncate", action="store_true",
                   help="keep the last tokens of prompts too long for the model's context instead of refusing them")
    g.add_argument("--batch-size", type=_int_range(1, 1024), default=32, help="prompts generated together (default 32)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the model's)")
    _add_expert_selection_args(g)
    g.add_argument("--stream", action="store_true", help="print the tokens as they come (one prompt)")
    g.add_argument("--json", action="store_true",
                   help="one JSON line per prompt (prompt, text, token_ids, finish_reason), then one with the speeds")
    g.add_argument("--quiet", action="store_true", help="nothing on stderr but errors")
    g.add_argument("--trace", metavar="FILE",
                   help="record every MoE layer's experts for each prompt and generated token (.npz routing trace)")
    _add_contrast_args(g)
    _add_steer_args(g)
    _add_offload_args(g)
    g.add_argument("--task", metavar="NAME", help="run as this task of the model's task head (a run written by "
                                                  "jmoe task-head)")
    w = g.add_argument_group("Mowst (a run written by jmoe mowst)")
    w.add_argument("--mowst", action="store_true",
                   help="decode with the run's weak expert where it is confident, the model only elsewhere")
    w.add_argument("--mowst-threshold", type=_float_range(0.0, 1.0), metavar="T",
                   help="confidence at or above which the weak expert decides a token (default: the run's)")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("trace", help="record a routing trace: every MoE layer's experts for each token of a text")
    t.add_argument("--ckpt", required=True, metavar="RUN_OR_HF_DIR", help="a jmoe run or a Hugging Face model directory")
    t.add_argument("--step", type=_int_range(0), help="a run's checkpoint step (default: latest)")
    t.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text, tokenized with the model's tokenizer")
    t.add_argument("--out", required=True, metavar="FILE", help="the routing trace to write (.npz), new unless --force")
    t.add_argument("--force", action="store_true", help="replace --out if it exists")
    t.add_argument("--seq-len", type=_int_range(2), help="tokens per sequence (default: the model's context)")
    t.add_argument("--max-tokens", type=_int_range(1), help="trace at most this many tokens of the text")
    t.add_argument("--batch-size", type=_int_range(1, 1024), default=8, help="sequences run together (default 8)")
    t.add_argument("--quiet", action="store_true", help="nothing on stderr but errors")
    t.set_defaults(func=cmd_trace)

    tr = sub.add_parser("trace-report", help="routing locality of a routing trace: SRP, SCH, popularity, reuse distances (JSON + plot)")
    tr.add_argument("trace", help="routing trace (.npz, format jmoe-routing-trace)")
    tr.add_argument("--out", required=True,
                    help="directory for report.json and report.png, or a path ending in .json (the figure goes next to it)")
    tr.add_argument("--segment-lengths", type=_int_range(1), nargs="+", default=[4, 16, 64, 256], metavar="M",
                    help="segment lengths (tokens) of SRP and SCH (default 4 16 64 256)")
    tr.add_argument("--cache-size", type=_int_range(1), help="cached experts per layer for SCH (default 2 x top-k)")
    tr.add_argument("--reuse-bins", type=_int_range(1, 4096), default=32, help="bins of the reuse-distance histograms (default 32)")
    tr.add_argument("--no-plot", action="store_true", help="write report.json only")
    tr.set_defaults(func=cmd_trace_report)

    from jmoe.parallel.placement import PLACEMENTS

    pc = sub.add_parser("place", help="place experts (and replicas of hot ones) on a mesh's devices from a routing trace: "
                                      "EPLB, ExFlow, MoETuner, greedy, round robin (JSON)")
    pc.add_argument("--trace", required=True, metavar="FILE", help="routing trace (.npz, from jmoe trace)")
    where = pc.add_mutually_exclusive_group(required=True)
    where.add_argument("--mesh", help='device mesh whose expert axis the experts go on, e.g. "data=2,expert=8"')
    where.add_argument("--devices", type=_int_range(1), help="devices of the expert axis")
    pc.add_argument("--method", default="eplb", choices=PLACEMENTS.names(), help="placement algorithm (default eplb)")
    pc.add_argument("--redundant", type=_int_range(0), default=0, metavar="R",
                    help="extra slots per MoE layer for replicas of hot experts (eplb; default 0)")
    pc.add_argument("--option", type=_router_option, action="append", metavar="KEY=VALUE",
                    help="an option of the method (repeatable; e.g. num_groups=4, num_nodes=2 for eplb)")
    pc.add_argument("--out", required=True, metavar="FILE", help="the placement to write (.json)")
    pc.set_defaults(func=cmd_place)

    from jmoe.infer.cachesim import CACHE_POLICIES

    cs = sub.add_parser("cache-sim", help="expert-cache hit rates of a routing trace under a replacement policy")
    cs.add_argument("trace", help="routing trace (.npz, format jmoe-routing-trace)")
    cs.add_argument("--cache-size", type=_int_range(1), required=True, help="expert slots per layer (at least the trace's top-k)")
    cs.add_argument("--policy", default="lru", choices=CACHE_POLICIES.names(),
                    help="replacement policy (default lru; belady is the offline optimum)")
    cs.add_argument("--prefetch", choices=("none", "oracle"), default="none",
                    help="oracle: load each token's true experts before it (the upper bound of a predictor)")
    cs.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    cs.set_defaults(func=cmd_cache_sim)

    from jmoe.merge.mergekit import supported_methods

    m = sub.add_parser("merge", help="merge checkpoints from a mergekit-style YAML configuration")
    m.add_argument("config", help="YAML file (mergekit schema: merge_method, base_model, models/slices, parameters, dtype; "
                                  f"merge_method: {', '.join(supported_methods())})")
    m.add_argument("out_dir", help="output directory (Hugging Face layout)")
    m.add_argument("--max-shard-size", default="5GB")
    m.add_argument("--seed", type=int, default=0, help="PRNG seed of random methods (dare, della)")
    m.add_argument("--force", action="store_true",
                   help="write into a non-empty OUT_DIR (the merged checkpoint replaces the one there; other files stay)")
    m.add_argument("--quiet", action="store_true")
    m.add_argument("--search", action="store_true",
                   help="search the configuration's numeric parameters with CMA-ES for the best score on --tasks; "
                        "OUT_DIR gets the best merge, best_config.yml (also printed) and search.jsonl")
    m.add_argument("--tasks", help="with --search: evaluation tasks to score candidates on (all, or names)")
    m.add_argument("--search-evals", type=_int_range(1), help="with --search: candidates to evaluate (default 40)")
    m.add_argument("--sigma", type=_float_range(0.0, open_lo=True), help="with --search: CMA-ES step size on the "
                   "[0, 1] scale of each parameter's range (default 0.2)")
    m.add_argument("--popsize", type=_int_range(2), help="with --search: CMA-ES population (default: cma's)")
    m.add_argument("--examples", type=_int_range(1), default=32, help="with --search: examples per algorithmic task")
    m.add_argument("--max-windows", type=_int_range(1), default=16, help="with --search: windows per text domain")
    m.set_defaults(func=cmd_merge)

    mb = sub.add_parser("moe-build", help="build an MoE model from dense models (mergekit-moe YAML: base_model, "
                        "gate_mode, experts with prompts, shared_experts)")
    mb.add_argument("config", help="YAML file (mergekit-moe schema; gate_mode: hidden, hidden_avg, cheap_embed, random, "
                                   "uniform_random; architecture: mixtral, qwen2_moe, qwen3_moe, jmoe); with --upcycle, "
                                   "the dense model's directory")
    mb.add_argument("--upcycle", type=_int_range(1), metavar="E",
                    help="sparse upcycling: E copies of CONFIG's (a dense model directory's) FFN under a new router")
    mb.add_argument("--partition", type=_int_range(1), metavar="E",
                    help="Union of Experts' MLP experts: split every FFN of CONFIG (a dense jmoe run) into E slices "
                         "under a zero router, written as a run to fine-tune")
    mb.add_argument("--top-k", type=_int_range(1), help="with --upcycle or --partition: experts per token (default 2)")
    mb.add_argument("--noise-scale", type=_float_range(0.0), help="with --upcycle: N(0, s) noise on each copy (default 0)")
    mb.add_argument("out_dir", metavar="OUT", help="output directory: Hugging Face for Hugging Face bases, a run for jmoe bases")
    mb.add_argument("--seed", type=_int_range(0, 2**32 - 1), default=0, help="seed of random gates and expert noise")
    mb.add_argument("--allow-identical", action="store_true",
                    help="build even when every expert is the same model or has the same prompts (upcycling)")
    mb.add_argument("--force", action="store_true", help="write into a non-empty OUT (files of the same name are replaced)")
    mb.add_argument("--quiet", action="store_true")
    mb.set_defaults(func=cmd_moe_build)

    pl = sub.add_parser("plan", help="dry run: mesh, parameter shardings and per-device memory of a run on a target topology")
    pl.add_argument("--preset", default="base", help="tiny | small | base (default base)")
    pl.add_argument("--mesh", required=True, help='device mesh of the run, e.g. "data=4,expert=8" (axes: data, fsdp, expert, model)')
    pl.add_argument("--hosts", type=_int_range(1), required=True, help="hosts (processes) of the target topology")
    pl.add_argument("--devices-per-host", type=_int_range(1), required=True, help="accelerators per host")
    pl.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override any config field (model., moe., train.), or an option of the layer's router, dispatch or balance loss: moe.<method>.<option>")
    pl.add_argument("--device-memory-gib", type=_float_range(0.0, open_lo=True),
                    help="memory of one device in GiB; exit 1 when the plan does not fit")
    pl.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    pl.set_defaults(func=cmd_plan)

    st = sub.add_parser("steer", help="find the experts whose selection tracks a behaviour (nPMI of contrastive "
                                      "prompts, RICE), to reinforce with jmoe generate --steer-experts")
    st.add_argument("--ckpt", required=True, metavar="RUN_OR_HF_DIR", help="a jmoe run or a Hugging Face model directory")
    st.add_argument("--step", type=_int_range(0), help="a run's checkpoint step (default: latest)")
    st.add_argument("--positive", required=True, metavar="FILE", help="prompts that show the behaviour, one a line")
    st.add_argument("--negative", required=True, metavar="FILE", help="prompts that do not, one a line")
    st.add_argument("--top", type=_int_range(1), default=2, help="experts to report (default 2, the paper's)")
    st.add_argument("--truncate", action="store_true",
                    help="keep the last tokens of prompts too long for the model's context instead of refusing them")
    st.add_argument("--json", action="store_true", help="one JSON object: the experts, the flag, every nPMI")
    st.set_defaults(func=cmd_steer)

    ce = sub.add_parser("compressed-experts", help="replace each token's lowest-ranked experts by compressed experts "
                        "(scaling vectors of the main experts), as a new run to fine-tune with train --resume-from")
    ce.add_argument("--ckpt", required=True, help="run directory")
    ce.add_argument("--out", required=True, help="new run directory, absent or empty")
    ce.add_argument("--compressed", type=_int_range(1), default=1, metavar="N",
                    help="experts of each token replaced (fewer than the layers' top-k; default 1)")
    ce.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    ce.add_argument("--quiet", action="store_true")
    ce.set_defaults(func=cmd_compressed_experts)

    mw = sub.add_parser("mowst", help="train a weak expert and a confidence gate on a run (Mowst), written as a new run "
                        "that jmoe generate --mowst decodes with the model only where the weak expert is unsure")
    mw.add_argument("--ckpt", required=True, help="run directory (the strong model)")
    mw.add_argument("--out", required=True, help="new run directory, absent or empty")
    mw.add_argument("--rounds", type=_int_range(1), default=2, help="alternating rounds (default 2)")
    mw.add_argument("--weak-steps", type=_int_range(1), default=200,
                    help="steps of each weak turn: the weak expert and gate train, the model frozen (default 200)")
    mw.add_argument("--strong-steps", type=_int_range(0), default=100,
                    help="steps of each strong turn: the model trains, the weak expert and gate frozen (default 100)")
    mw.add_argument("--lr", type=_float_range(0.0, open_lo=True), default=1e-3, help="weak-turn learning rate")
    mw.add_argument("--strong-lr", type=_float_range(0.0, open_lo=True), default=1e-3,
                    help="strong-turn learning rate")
    mw.add_argument("--threshold", type=_float_range(0.0, 1.0), default=0.5,
                    help="confidence at or above which decoding skips the model (default 0.5)")
    mw.add_argument("--window", type=_int_range(1, 64), default=1,
                    help="tokens the weak expert reads: the current one and those before it (default 1)")
    mw.add_argument("--hidden", type=_int_range(1), default=128, help="the weak expert's hidden width (default 128)")
    mw.add_argument("--step", type=_int_range(0), help="checkpoint step (default: latest)")
    mw.add_argument("--seed", type=_int_range(0), default=0)
    mw.add_argument("--quiet", action="store_true")
    mw.set_defaults(func=cmd_mowst)

    th = sub.add_parser("task-head", help="train a multi-task head (HoME, MMoE or one shared mixture) over evaluation "
                        "tasks on a frozen run, written as a new run that evaluate and generate --task run per task")
    th.add_argument("--ckpt", required=True, help="run directory (the frozen model)")
    th.add_argument("--out", required=True, help="new run directory, absent or empty")
    th.add_argument("--tasks", default="all", metavar="all|NAMES", help="the head's tasks (default all)")
    th.add_argument("--head", choices=["home", "mmoe", "shared"], default="home",
                    help="home: shared, category and task experts with HoME's gates and fixes; mmoe: one gate and "
                         "tower per task over shared experts; shared: one mixture for every task (default home)")
    th.add_argument("--experts", type=_int_range(1, 1024), default=8, help="experts of mmoe and shared (default 8)")
    th.add_argument("--hidden", type=_int_range(1), help="expert width (default the model's width)")
    th.add_argument("--steps", type=_int_range(1), default=300, help="training steps (default 300)")
    th.add_argument("--lr", type=_float_range(0.0, open_lo=True), default=1e-3, help="learning rate (default 1e-3)")
    th.add_argument("--rows", type=_int_range(1, 4096), help="windows per task per step (default: the run's batch "
                                                              "size over the number of tasks)")
    th.add_argument("--eval-batches", type=_int_range(1, 1000), default=4,
                    help="validation batches per task for the report (default 4)")
    th.add_argument("--step", type=_int_range(0), help="checkpoint step (default: latest)")
    th.add_argument("--seed", type=_int_range(0), default=0)
    th.add_argument("--quiet", action="store_true")
    th.set_defaults(func=cmd_task_head)

    u = sub.add_parser("unlearn", help="make a run forget an evaluation task by unlearning in its most tied expert (UOE)")
    u.add_argument("--ckpt", required=True, help="run directory")
    u.add_argument("--out", required=True, help="new run directory, absent or empty")
    u.add_argument("--forget", required=True, metavar="TASK", help="the evaluation task to forget")
    u.add_argument("--retain", metavar="NAMES", help="tasks whose text to keep (gdiff's retain loss; reported)")
    u.add_argument("--method", choices=["ga", "gdiff", "npo"], default="ga",
                   help="ga: gradient ascent; gdiff: ascent on the forget text, descent on the retain text; npo")
    u.add_argument("--scope", choices=["expert", "all"], default="expert",
                   help="expert (UOE): the expert with the highest router affinity to the forget text and its router; "
                        "all: every parameter")
    u.add_argument("--steps", type=_int_range(1), default=50, help="unlearning steps, >= 1 (default 50)")
    u.add_argument("--lr", type=_float_range(0.0, open_lo=True), default=1e-4)
    u.add_argument("--alpha", type=_float_range(0.0), default=1.0, help="weight of the router anchor (scope expert)")
    u.add_argument("--retain-weight", type=_float_range(0.0), default=1.0, help="gdiff: weight of the retain loss")
    u.add_argument("--npo-beta", type=_float_range(0.0, open_lo=True), default=0.1)
    u.add_argument("--batches", type=_int_range(1), default=8, help="training windows of the forget (and retain) text, "
                   "in batches of the run's shape")
    u.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--quiet", action="store_true")
    u.set_defaults(func=cmd_unlearn)

    c = sub.add_parser("compress", help="merge, prune or compress the experts of a run (M-SMoE, MC-SMoE, baselines)")
    c.add_argument("--ckpt", required=True, help="run directory to reduce")
    c.add_argument("--out", required=True, help="new run directory, absent or empty (jmoe eval / train --resume-from accept it)")
    from jmoe.merge.experts.registry import COMPRESS_METHODS

    c.add_argument("--method", required=True, choices=[*COMPRESS_METHODS.names(), "premoe"],
                   help="; ".join(f"{n}: {COMPRESS_METHODS.get(n).doc}" for n in COMPRESS_METHODS)
                   + "; premoe: keep each task's experts (PreMoe), chosen per prompt at generation")
    c.add_argument("--target-experts", type=float, help="experts per MoE layer, on average over layers")
    c.add_argument("--experts-per-layer", type=_int_range(1), metavar="M", help="premoe: experts each task keeps per layer")
    c.add_argument("--tasks", metavar="all|NAMES", help="premoe: the evaluation tasks to collect statistics of")
    c.add_argument("--examples", type=_int_range(1, 100_000), default=64,
                   help="premoe: calibration examples (or text windows) per task (default 64)")
    c.add_argument("--rank", type=int, help="mcsmoe: rank of the low-rank factors")
    c.add_argument("--sparsity", type=float, help="mcsmoe: fraction of the sparse residual dropped")
    c.add_argument("--budget", type=float, help="mcsmoe: stored size as a fraction of the experts (instead of --sparsity)")
    c.add_argument("--importance", choices=["magnitude", "sensitivity"],
                   help="mcsmoe: how residual columns are ranked (|w| or |w * grad|; default magnitude)")
    c.add_argument("--router", choices=["share", "merge"],
                   help="methods that merge: share (default): the router keeps its outputs, grouped experts share weights; "
                        "merge: router columns merged too")
    c.add_argument("--align", choices=["weight", "activation", "none"],
                   help="msmoe, mcsmoe: neuron alignment before merging (default weight)")
    c.add_argument("--calib-batches", type=int, default=8, help="calibration batches from the training split")
    c.add_argument("--calib-data", help="calibrate on this text instead of the run's corpus")
    c.add_argument("--stats", help="routing statistics (routing_stats.npz) saved by an earlier compress of the same run")
    c.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compress)

    f = sub.add_parser("finetune", help="train adapters (LoRA, MixLoRA, SMoRA, DynMoLE) on a frozen jmoe run or "
                       "Hugging Face model")
    f.add_argument("--ckpt", required=True, metavar="RUN_OR_HF_DIR", help="the model to adapt; it is never written")
    f.add_argument("--out", required=True, help="the fine-tuning run's directory (adapters, optimizer, metrics)")
    f.add_argument("--adapter", default="mixlora", choices=["lora", "mixlora", "smora", "dynmole"],
                   help="lora: plain LoRA; mixlora (default): top-k LoRA experts on each FFN; smora: each rank of "
                        "one LoRA an expert; dynmole: LoRA experts per projection, Tsallis-entropy routing")
    f.add_argument("--experts", type=_int_range(1), help="LoRA experts (mixlora, dynmole; default 8)")
    f.add_argument("--top-k", type=_int_range(1), help="experts per token (mixlora), active ranks (smora), experts "
                   "kept at least (dynmole); default 2")
    f.add_argument("--rank", type=_int_range(1), help="rank of each LoRA (smora: of the one LoRA); default 8")
    f.add_argument("--alpha", type=_float_range(0.0, open_lo=True), help="LoRA scale numerator (default 2 x rank)")
    f.add_argument("--targets", type=_names, metavar="gate,up,down",
                   help="FFN projections that take adapters (default all three; none: no FFN adapters)")
    f.add_argument("--attn-targets", type=_names, metavar="wq,wk,wv,wo",
                   help="attention weights that take a plain LoRA (default none)")
    f.add_argument("--layers", type=_int_list, metavar="I,J,...", help="layers that take adapters (default all)")
    f.add_argument("--dropout", type=_float_range(0.0, 1.0), help="dropout on the LoRA inputs (default 0)")
    f.add_argument("--moe-mode", choices=["per_expert", "shared"],
                   help="MoE layers: a LoRA per routed expert (default) or one shared by all")
    f.add_argument("--data", help="text file or directory to train on")
    f.add_argument("--tasks", metavar="NAMES", help="train on a mixture of evaluation tasks instead (see jmoe train)")
    f.add_argument("--task-mix", metavar="WEIGHTS", help="the tasks' weights in the mixture")
    f.add_argument("--steps", type=_int_range(1), help=f"optimizer steps (default {FINETUNE_DEFAULTS['steps']})")
    f.add_argument("--batch-size", type=_int_range(1), help=f"sequences per step (default {FINETUNE_DEFAULTS['batch_size']})")
    f.add_argument("--seq-len", type=_int_range(2), help="tokens per sequence (default 128, at most the model's context)")
    f.add_argument("--lr", type=_float_range(0.0, open_lo=True), help=f"peak learning rate (default {FINETUNE_DEFAULTS['lr']})")
    f.add_argument("--seed", type=_int_range(0, 2**32 - 1), help="seed of the adapters, batches and dropout (default 0)")
    f.add_argument("--eval-every", type=_int_range(1), metavar="N", help="validate every N steps")
    f.add_argument("--ckpt-every", type=_int_range(1), metavar="N", help="checkpoint every N steps")
    f.add_argument("--set", action="append", metavar="adapter.OPTION=VALUE",
                   help="an option of the adapter, e.g. adapter.aux_loss_coef=0.01 (mixlora), adapter.top_p=0.75 (dynmole)")
    f.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    f.add_argument("--stop-after", type=_int_range(1), metavar="N", help="stop with a checkpoint after N steps")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_finetune)

    el = sub.add_parser("extract-lora", help="the difference between a fine-tuned Hugging Face model and its base "
                        "as a PEFT LoRA adapter (truncated SVD per weight matrix; mergekit-extract-lora)")
    el.add_argument("finetuned", metavar="FINETUNED", help="the fine-tuned model's directory (safetensors)")
    el.add_argument("base", metavar="BASE", help="the base model's directory (safetensors)")
    el.add_argument("out", metavar="OUT", help="the adapter's directory, absent or empty")
    el.add_argument("--rank", type=int, default=32, help="the LoRA rank (at most; smaller matrices keep their full rank)")
    el.add_argument("--skip-undecomposable", action="store_true",
                    help="leave out changed weights that are not matrices (norms) instead of saving them whole")
    el.add_argument("--force", action="store_true", help="write into a non-empty OUT (files of the same name are replaced)")
    el.add_argument("--quiet", action="store_true")
    el.set_defaults(func=cmd_extract_lora)

    ml = sub.add_parser("merge-lora", help="fold the plain LoRA of a fine-tuning run into its model: a Hugging Face "
                        "directory for a Hugging Face model, a run for a jmoe one")
    ml.add_argument("--ckpt", required=True, metavar="RUN", help="a jmoe finetune run with --adapter lora")
    ml.add_argument("--out", required=True, help="the merged model's directory, absent or empty")
    ml.add_argument("--step", type=_int_range(0), help="checkpoint to merge (default the newest)")
    ml.add_argument("--force", action="store_true", help="write into a non-empty --out (files of the same name are replaced)")
    ml.add_argument("--quiet", action="store_true")
    ml.set_defaults(func=cmd_merge_lora)

    q = sub.add_parser("quantize", help="quantize the experts of a run (round to nearest, HQQ, GPTQ, MC-MoE's "
                       "mixed precision)")
    q.add_argument("--ckpt", required=True, help="run directory whose experts to quantize")
    q.add_argument("--out", required=True, help="new run directory, absent or empty (jmoe eval, evaluate and generate "
                   "read it)")
    q.add_argument("--method", default="hqq", choices=["rtn", "hqq", "gptq", "mcmoe"],
                   help="rtn: round to nearest; hqq (default): with HQQ's zero-point refinement; gptq: with "
                        "calibration; mcmoe: a width per expert from MC-MoE's integer program, then GPTQ")
    width = q.add_mutually_exclusive_group()
    width.add_argument("--bits", type=int, help="width of every expert (1, 2, 3, 4, 8): rtn, hqq, gptq")
    width.add_argument("--avg-bits", type=_float_range(0.0, open_lo=True), metavar="B",
                       help="mcmoe: average width of the experts, e.g. 2.5")
    q.add_argument("--candidates", type=_int_list, metavar="B,B,...",
                   help="mcmoe: the widths to choose from (default: the supported widths within one of --avg-bits)")
    q.add_argument("--global-budget", action="store_true",
                   help="mcmoe: one budget over all layers instead of one per layer (the reference's)")
    q.add_argument("--group-size", type=_int_range(1), default=64,
                   help="weights per scale and zero point, along each matrix's input axis (default 64)")
    q.add_argument("--skip-ratio", type=_float_range(0.0, 1.0), metavar="R",
                   help="store online expert skipping at ratio R in the new run (see jmoe eval --skip-ratio)")
    q.add_argument("--calib-batches", type=_int_range(1, 4096), default=8,
                   help="gptq, mcmoe: calibration batches from the training split (default 8)")
    q.add_argument("--calib-data", help="calibrate on this text instead of the run's corpus")
    q.add_argument("--step", type=_int_range(0), help="checkpoint step (default: latest)")
    q.add_argument("--seed", type=int, default=0, help="which calibration batches are drawn")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jmoe.data import CorpusError
    from jmoe.io.safetensors import SafetensorsError
    from jmoe.merge.tree import MergeError
    from jmoe.train.checkpoint import CheckpointError
    from jmoe.train.trainer import NonFiniteLoss, TrainError

    _quiet_libraries()
    try:
        return args.func(args)
    except NonFiniteLoss as e:
        _error_line(args, e, prefix="")
        return EXIT_DIVERGED
    except (TrainError, CorpusError, CheckpointError, MergeError, SafetensorsError, ValueError) as e:
        _error_line(args, e)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"jmoe {args.command}: interrupted", file=sys.stderr)
        return 130


def _error_line(args, e: BaseException, prefix: str = "error: ") -> None:
    """`e` as one line on stderr, naming the command."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    print(f"jmoe {args.command}: {prefix}{text}", file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    """Keep what orbax logs through absl, and asyncio's reports of the reads a failed restore
    left behind, off the terminal: jmoe says what matters in its own words."""
    import logging

    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


if __name__ == "__main__":
    sys.exit(main())
