"""The `jmoe` command: train, eval, generate, merge.

Exit codes: 0 success, 2 a usage or input error (one line on stderr, nothing on disk
changed), 3 the loss diverged (the last good checkpoint is kept), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_DIVERGED = 3


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _apply_overrides(model_cfg, tc, overrides: list[str]):
    """Apply `--set section.field=value` overrides (sections: model, moe, train)."""
    model_changes, moe_changes, train_changes = {}, {}, {}
    sections = {"model": model_changes, "moe": moe_changes, "train": train_changes}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--set {item!r} must look like section.field=value (sections: model, moe, train)")
        key, value = item.split("=", 1)
        section, field = key.split(".", 1)
        if section not in sections:
            raise ValueError(f"--set {item!r}: unknown section {section!r} (use model, moe or train)")
        sections[section][field] = _parse_value(value)
    if model_cfg.moe is not None and "d_model" in model_changes:
        moe_changes.setdefault("d_model", model_changes["d_model"])  # the MoE layers follow the model width
    if moe_changes:
        if model_cfg.moe is None:
            raise ValueError("--set moe.*: the model has no MoE layers (--dense)")
        model_changes["moe"] = model_cfg.moe.replace(**moe_changes)
    if model_changes:
        model_cfg = model_cfg.replace(**model_changes)
    if train_changes:
        tc = tc.replace(**train_changes)
    return model_cfg, tc


def _build_train_configs(args):
    from jmoe.nn.presets import preset
    from jmoe.nn.transformer import LMConfig
    from jmoe.train.config import TrainConfig

    out = Path(args.out or f"runs/{args.preset or 'tiny'}")
    saved_path = out / "config.json"
    if args.resume and saved_path.exists() and (out / "checkpoints").is_dir():
        try:
            saved = json.loads(saved_path.read_text())
            model_cfg = LMConfig.from_dict(saved["model"])
            tc = TrainConfig.from_dict(saved["train"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{saved_path} is corrupt: {e}") from None
        if args.preset is not None:
            p = preset(args.preset)
            if p["model"] != model_cfg and not args.dense:
                raise ValueError(f"cannot resume: --preset {args.preset} differs from the run in {out}")
    elif args.resume_from:
        if args.preset is not None:
            raise ValueError("--resume-from takes the model of that run; it conflicts with --preset")
        source = Path(args.resume_from)
        try:
            saved = json.loads((source / "config.json").read_text())
            model_cfg = LMConfig.from_dict(saved["model"])
            tc = TrainConfig.from_dict(saved["train"])
        except FileNotFoundError:
            raise ValueError(f"--resume-from {source} is not a jmoe run directory (no config.json)") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source / 'config.json'} is corrupt: {e}") from None
        tc = tc.replace(init_from=str(source.absolute()), distill_from=None)
    else:
        p = preset(args.preset or "tiny")
        model_cfg, tc = p["model"], TrainConfig(**p["train"])

    moe_changes = {
        k: v
        for k, v in {
            "router": args.router,
            "dispatch": args.dispatch,
            "impl": args.impl,
            "num_experts": args.num_experts,
            "top_k": args.top_k,
            "capacity_factor": args.capacity_factor,
        }.items()
        if v is not None
    }
    if args.dense:
        if moe_changes:
            raise ValueError(f"--dense conflicts with MoE options: {', '.join(sorted(moe_changes))}")
        if model_cfg.moe is not None:
            model_cfg = model_cfg.replace(moe=None)
    elif moe_changes:
        if model_cfg.moe is None:
            raise ValueError("this model has no MoE layers")
        model_cfg = model_cfg.replace(moe=model_cfg.moe.replace(**moe_changes))
    train_changes = {
        k: v
        for k, v in {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "seed": args.seed,
            "data": args.data,
            "eval_every": args.eval_every,
            "ckpt_every": args.ckpt_every,
            "keep_ckpts": args.keep_ckpts,
            "mesh": args.mesh,
            "ep_impl": args.ep_impl,
            "ep_capacity_factor": args.ep_capacity_factor,
            "distill_from": None if args.distill_from is None else str(Path(args.distill_from).absolute()),
            "distill_weight": args.distill_weight,
            "distill_temperature": args.distill_temperature,
        }.items()
        if v is not None
    }
    if train_changes:
        tc = tc.replace(**train_changes)
    model_cfg, tc = _apply_overrides(model_cfg, tc, args.set or [])
    if tc.seq_len > model_cfg.max_seq_len and not args.resume:
        model_cfg = model_cfg.replace(max_seq_len=tc.seq_len)
    return model_cfg, tc, out


def cmd_train(args) -> int:
    from jmoe.train.trainer import train

    model_cfg, tc, out = _build_train_configs(args)
    train(
        model_cfg, tc, out, resume=args.resume, stop_after=args.stop_after,
        progress=not args.quiet, log=lambda m: print(m, flush=True),
    )
    return 0


def cmd_eval(args) -> int:
    from jmoe.data import eval_batches, load_corpus
    from jmoe.train.trainer import evaluate, load_run

    model_cfg, tc, params, router_state, saved, step = load_run(args.ckpt, args.step)
    corpus = load_corpus(args.data if args.data is not None else tc.data)
    if args.data is None and corpus.sha256 != saved.get("data", {}).get("sha256"):
        print("note: the corpus on this machine differs from the one the run was trained on", file=sys.stderr)
    batches = eval_batches(corpus.val, args.batches, tc.batch_size, tc.seq_len)
    ev = evaluate(params, router_state, model_cfg, batches)
    result = {"run": str(args.ckpt), "step": step, "data": corpus.source, **ev}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"run {args.ckpt} at step {step} on {corpus.source}")
    print(f"validation loss {ev['val_loss']:.4f} nats/byte, {ev['val_bpb']:.4f} bits/byte")
    for li, (layer, load) in enumerate(zip(model_cfg.moe_layers, ev["load"])):
        cells = " ".join(f"{x:.3f}" for x in load)
        print(f"layer {layer} expert load: {cells}  (MaxVio {max(load) * len(load) - 1:.2f})")
    return 0


def cmd_generate(args) -> int:
    import jax

    from jmoe.nn.sampling import generate
    from jmoe.train.trainer import load_run

    model_cfg, _, params, router_state, _, _ = load_run(args.ckpt, args.step)
    prompt = list(args.prompt.encode("utf-8"))
    new = generate(
        params, model_cfg, prompt, args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k or None, key=jax.random.key(args.seed), router_state=router_state,
    )
    sys.stdout.write(bytes(prompt + new).decode("utf-8", errors="replace") + "\n")
    return 0


def _add_distributed_args(p) -> None:
    p.add_argument("--cpu-devices", type=int, metavar="N", help="simulate N CPU devices in this process")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process run: the coordinator's address")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--distributed", action="store_true", help="multi-process run configured by the cluster environment (TPU pods, SLURM, ...)")


def _start_runtime(args) -> None:
    """Device simulation and jax.distributed, before JAX touches a backend."""
    from jmoe.parallel.distributed import initialize, set_cpu_device_count

    if getattr(args, "cpu_devices", None):
        set_cpu_device_count(args.cpu_devices)
    coordinator = getattr(args, "coordinator", None)
    if coordinator or getattr(args, "distributed", False):
        if coordinator and (args.num_processes is None or args.process_id is None):
            raise ValueError("--coordinator needs --num-processes and --process-id")
        initialize(coordinator, args.num_processes, args.process_id)


def cmd_merge(args) -> int:
    from jmoe.merge.checkpoints import run_merge
    from jmoe.merge.mergekit import parse_config

    config = Path(args.config)
    if not config.exists():
        raise ValueError(f"merge configuration {str(config)!r} does not exist")
    plan = parse_config(config)
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ValueError(f"{out} is not empty; choose another OUT_DIR or pass --force")
    run_merge(plan, out, max_shard_size=args.max_shard_size, seed=args.seed, progress=not args.quiet,
              log=lambda m: print(m, flush=True))
    return 0


def cmd_compress(args) -> int:
    from jmoe.merge.experts.run import compress_run

    compress_run(
        args.ckpt, args.out, method=args.method, target_experts=args.target_experts, rank=args.rank,
        sparsity=args.sparsity, budget=args.budget, importance=args.importance, router=args.router,
        align=None if args.align == "none" else args.align, calib_batches=args.calib_batches,
        calib_data=args.calib_data, stats=args.stats, step=args.step, seed=args.seed,
        log=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)),
    )
    return 0


def cmd_plan(args) -> int:
    from jmoe.nn.presets import preset
    from jmoe.parallel.plan import plan_run
    from jmoe.train.config import TrainConfig

    p = preset(args.preset)
    model_cfg, tc = _apply_overrides(p["model"], TrainConfig(**p["train"]), args.set or [])
    plan = plan_run(model_cfg, tc, args.mesh, hosts=args.hosts, devices_per_host=args.devices_per_host)
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
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--seq-len", type=int)
    t.add_argument("--out", help="run directory (default runs/<preset>)")
    t.add_argument("--router", help="router name, e.g. topk")
    t.add_argument("--dispatch", help="dropless | capacity | dense")
    t.add_argument("--impl", help="dropless implementation: auto | xla | ragged_dot")
    t.add_argument("--num-experts", type=int)
    t.add_argument("--top-k", type=int)
    t.add_argument("--capacity-factor", type=float)
    t.add_argument("--dense", action="store_true", help="dense FFN baseline (no MoE layers)")
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--data", help="text file or directory (default: the embedded stdlib corpus)")
    t.add_argument("--eval-every", type=int)
    t.add_argument("--ckpt-every", type=int)
    t.add_argument("--keep-ckpts", type=int)
    t.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override any config field (model., moe., train.)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--resume-from", metavar="DIR", help="start from the model of another run (e.g. one written by 'jmoe compress'), with a fresh optimizer")
    t.add_argument("--distill-from", metavar="DIR", help="distil from this run's model (knowledge distillation)")
    t.add_argument("--distill-weight", type=float, help="weight of the distillation loss (default 0.5)")
    t.add_argument("--distill-temperature", type=float, help="softmax temperature of distillation (default 1)")
    t.add_argument("--mesh", help='device mesh, e.g. "data=2,expert=4" (axes: data, fsdp, expert, model)')
    t.add_argument("--ep-impl", help="expert-parallel token exchange: auto | padded | ragged | allgather")
    t.add_argument("--ep-capacity-factor", type=float, help="expert-parallel buffer size factor (default 2.0)")
    _add_distributed_args(t)
    t.add_argument("--stop-after", type=int, metavar="N", help="stop with a checkpoint after N steps in this process (resume later with --resume)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="validation loss, bits per byte and expert load of a run")
    e.add_argument("--ckpt", required=True, help="run directory")
    e.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    e.add_argument("--data", help="evaluate on this text instead of the run's corpus")
    e.add_argument("--batches", type=int, default=8)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="sample text from a run")
    g.add_argument("--ckpt", required=True, help="run directory")
    g.add_argument("--step", type=int)
    g.add_argument("--prompt", default="def ")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("merge", help="merge checkpoints from a mergekit-style YAML configuration")
    m.add_argument("config", help="YAML file (mergekit schema: merge_method, base_model, models/slices, parameters, dtype)")
    m.add_argument("out_dir", help="output directory (Hugging Face layout)")
    m.add_argument("--max-shard-size", default="5GB")
    m.add_argument("--seed", type=int, default=0, help="PRNG seed of random methods (dare, della)")
    m.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(func=cmd_merge)

    pl = sub.add_parser("plan", help="dry run: mesh, parameter shardings and per-device memory of a run on a target topology")
    pl.add_argument("--preset", default="base")
    pl.add_argument("--mesh", required=True, help='e.g. "data=4,expert=8"')
    pl.add_argument("--hosts", type=int, required=True)
    pl.add_argument("--devices-per-host", type=int, required=True)
    pl.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override any config field (model., moe., train.)")
    pl.add_argument("--device-memory-gib", type=float, help="memory of one device; exit 1 when the plan does not fit")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    c = sub.add_parser("compress", help="merge, prune or compress the experts of a run (M-SMoE, MC-SMoE, baselines)")
    c.add_argument("--ckpt", required=True, help="run directory to reduce")
    c.add_argument("--out", required=True, help="new run directory (jmoe eval / train --resume-from accept it)")
    c.add_argument("--method", required=True, choices=["msmoe", "mcsmoe", "average", "random", "prune"])
    c.add_argument("--target-experts", type=float, required=True, help="experts per MoE layer, on average over layers")
    c.add_argument("--rank", type=int, help="mcsmoe: rank of the low-rank factors")
    c.add_argument("--sparsity", type=float, help="mcsmoe: fraction of the sparse residual dropped")
    c.add_argument("--budget", type=float, help="mcsmoe: stored size as a fraction of the experts (instead of --sparsity)")
    c.add_argument("--importance", default="magnitude", choices=["magnitude", "sensitivity"],
                   help="mcsmoe: how residual columns are ranked (|w| or |w * grad|)")
    c.add_argument("--router", default="share", choices=["share", "merge"],
                   help="share: the router keeps its outputs, grouped experts share weights; merge: router columns merged too")
    c.add_argument("--align", default="weight", choices=["weight", "activation", "none"], help="msmoe: neuron alignment before merging")
    c.add_argument("--calib-batches", type=int, default=8, help="calibration batches from the training split")
    c.add_argument("--calib-data", help="calibrate on this text instead of the run's corpus")
    c.add_argument("--stats", help="routing statistics (.npz) saved by an earlier compress")
    c.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compress)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jmoe.data import CorpusError
    from jmoe.io.safetensors import SafetensorsError
    from jmoe.merge.tree import MergeError
    from jmoe.train.checkpoint import CheckpointError
    from jmoe.train.trainer import NonFiniteLoss, TrainError

    try:
        _start_runtime(args)
        return args.func(args)
    except NonFiniteLoss as e:
        print(f"jmoe {args.command}: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except (TrainError, CorpusError, CheckpointError, MergeError, SafetensorsError, ValueError) as e:
        print(f"jmoe {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"jmoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
