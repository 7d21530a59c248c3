"""`jmoe generate`: text from a jmoe run or a Hugging Face model directory.

Everything the command is given is checked before the weights are read: the directory,
its tokenizer (and chat template with --chat), the prompts against the model's context and
vocabulary, and the sampling flags.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jmoe.infer.engine import prepare_prompts
from jmoe.infer.load import encode_prompt, open_model
from jmoe.infer.sampling import SamplingParams


def read_prompts(args) -> list[str]:
    """The prompts of --prompt or --prompts-file (one a line; blank lines skipped)."""
    if args.prompts_file is None:
        if args.prompt == "":
            raise ValueError("--prompt is empty")
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise ValueError(f"--prompts-file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path} has no prompts (one a line)")
    return prompts


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
    source = open_model(args.ckpt, step=args.step)
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

    model = source.load()
    if args.dtype:
        model.cfg = model.cfg.replace(dtype=args.dtype)
    engine = model.engine(args.batch_size)
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

    gens, stats = engine.generate(ids, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_ids=stop_ids,
                                  seed=args.seed, truncate=args.truncate, on_token=on_token,
                                  progress=not (args.quiet or args.stream) and len(prompts) > 1)
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
    if args.json:
        out.write(json.dumps({"prefill_tokens_per_s": stats.prefill_tokens_per_s,
                              "decode_tokens_per_s": stats.decode_tokens_per_s,
                              "prompt_tokens": stats.prompt_tokens, "decode_tokens": stats.decode_tokens,
                              "compile_s": stats.compile_s}) + "\n")
    elif not args.quiet:
        err.write(f"{len(gens)} prompt(s): prefill {stats.prefill_tokens_per_s:,.0f} tokens/s, decode "
                  f"{stats.decode_tokens_per_s:,.0f} tokens/s (compiling took {stats.compile_s:.1f} s)\n")
    out.flush()
    return 0
