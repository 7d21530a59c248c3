"""Generation speed: jmoe's KV-cached engine vs transformers `generate` vs jmoe's old window path.

On CPU (default), for two random-weight models of about 100M parameters, each loaded into
jmoe from the same checkpoint (`jmoe.io.hf`):
  mixtral      Mixtral-like: E=8, k=2, grouped-query attention
  deepseek_v3  DeepSeek-V3-like: MLA attention, E=64, k=6, one shared expert, first layer dense
and, at batch 1 and 8, 128-token prompts (random ids) and 128 new tokens, greedy:
  jmoe          `jmoe.infer.Engine.generate` (its own prefill/decode timings; a first call
                compiles, later calls are timed)
  transformers  `model.generate(do_sample=False)` with its static cache and with its default
                dynamic cache; prefill = generate with 1 new token, decode = generate with
                128 new tokens minus that. The comparison uses the faster of the two caches.
  window        jmoe's previous sampler (`jmoe.nn.sampling` until it was replaced, kept
                below): every new token re-runs the model over a fixed window (here
                prompt + new tokens, the smallest that holds the generation), one prompt at
                a time. Timed over fewer new tokens (--window-tokens), as a rate per token.
Both frameworks run on the same 2 threads, side by side: each repeat times every framework
once (median of --repeats). Decode tokens are B * (new tokens - 1) for all of them: the
prefill gives the first token, each decode step one more per row. Before timing, the greedy
tokens of jmoe are checked against transformers' (and the window path's): agreement is the
number of leading tokens that match (random-weight models have near-ties, so a late
divergence is float rounding, not a bug).

Prints a table and writes experiments/results/bench_decode.json. Goal: jmoe decodes at least
1.5x as fast as transformers at batch 1 and at batch 8.

With --gpu (one NVIDIA H100/H200, jax[cuda]): a Mixtral-shaped jmoe model (d=4096, f=14336,
E=8, k=2, 32 heads, 8 kv heads, vocab 32000), bf16 weights and compute, random weights, as
many layers as fit in about 120 GB (and in 85% of the device's memory: 39 layers on an H200,
22 on an 80 GB H100); batch 1 and 32, 128-token prompts, 128 new tokens; decode
tokens/s and the share of the HBM bandwidth it achieves: bytes read per decode step
(attention, router, the selected experts, an embedding row, the unembedding, the live part
of the KV cache) / step time / the device's bandwidth. Writes
experiments/results/bench_decode_gpu.json. `--gpu --quick` runs the same code at tiny size
(on CPU it skips the bandwidth division).

    python experiments/bench_decode.py                 # CPU, about 6 minutes on 2 cores
    python experiments/bench_decode.py --quick         # tiny sizes, checks the script
    python experiments/bench_decode.py --gpu           # one H100/H200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

if "--gpu" in sys.argv:  # before jax starts its backend: let the weights take most of the GPU's memory
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.infer import Engine
from jmoe.infer.engine import MIN_PROMPT_BUCKET, length_bucket
from jmoe.infer.forward import serving_moe
from jmoe.nn import init_lm, lm_apply
from jmoe.nn.transformer import LMConfig, lm_state_from_params

RESULTS = Path(__file__).parent / "results" / "bench_decode.json"
GPU_RESULTS = Path(__file__).parent / "results" / "bench_decode_gpu.json"
GOAL = 1.5  # jmoe decode tokens/s over transformers'
CACHES = ("static", "dynamic")
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # SXM parts


# ---------------------------------------------------------------- the models (CPU)


def hf_configs(quick: bool) -> dict:
    """The transformers configs of the two models (max_position_embeddings leaves room for
    prompt + new tokens; random weights, so nothing else depends on it)."""
    import transformers as T

    if quick:
        common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=256)
        return {
            "mixtral": T.MixtralConfig(**common, num_key_value_heads=2, intermediate_size=128, num_local_experts=8,
                                       num_experts_per_tok=2),
            "deepseek_v3": T.DeepseekV3Config(**common, intermediate_size=128, moe_intermediate_size=32,
                                              n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=1,
                                              first_k_dense_replace=1, n_group=8, topk_group=4, q_lora_rank=32,
                                              kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                              v_head_dim=16, routed_scaling_factor=2.5),
        }
    # About 100M parameters each, vocabulary 8192 (32000 would spend a third of the budget on
    # the embeddings). DeepSeek-V3's MLA ratios scaled from d=7168 to d=512: q_lora_rank
    # 1536 -> 192, kv_lora_rank 512 -> 128, rope/nope/v head dims 64/128/128 -> 32/64/64;
    # routed experts 2048 / 7168 of d wide -> 160; 8 groups, top-4 groups, scale 2.5.
    common = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                  max_position_embeddings=4096)
    return {
        "mixtral": T.MixtralConfig(**common, num_key_value_heads=2, intermediate_size=1152, num_local_experts=8,
                                   num_experts_per_tok=2),
        "deepseek_v3": T.DeepseekV3Config(**common, intermediate_size=1408, moe_intermediate_size=160,
                                          n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=1,
                                          first_k_dense_replace=1, n_group=8, topk_group=4, q_lora_rank=192,
                                          kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                                          routed_scaling_factor=2.5),
    }


def build(arch: str, hf_cfg, root: str):
    """A randomly initialised transformers model (its own init; DeepSeek's selection bias drawn
    too, so that the router state matters), saved for `hf.load`."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)
    model.generation_config.eos_token_id = None  # always generate max_new_tokens
    path = Path(root) / arch
    model.save_pretrained(path)
    return model, path


def shapes_of(cfg: LMConfig) -> dict:
    moe = cfg.moe
    out = dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
               d_ff_dense=cfg.d_ff, dense_layers=list(cfg.dense_layers), num_experts=moe.num_experts, top_k=moe.top_k,
               d_ff_expert=moe.d_ff, num_shared_experts=moe.num_shared_experts, router=moe.router,
               attention=cfg.attention.kind, dtype=cfg.dtype or "float32")
    if cfg.attention.kind == "mla":
        a = cfg.attention
        out.update(q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
                   qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim)
    else:
        out.update(n_kv_heads=cfg.kv_heads, head_dim=cfg.head_dim)
    return out


# ---------------------------------------------------------------- the old path (window)
# jmoe.nn.sampling at commit 6bfa22a (greedy and top-k sampling, re-running the model over a
# fixed window of cfg.max_seq_len tokens for every new token, one prompt at a time).


@partial(jax.jit, static_argnames=("cfg", "top_k"))
def _next_token(params, router_state, buf, pos, key, temperature, cfg, top_k):
    logits, _ = lm_apply(params, buf, cfg, state=router_state)
    last = jax.lax.dynamic_index_in_dim(logits[0], pos - 1, keepdims=False)  # [V]
    greedy = jnp.argmax(last)
    scaled = last / jnp.maximum(temperature, 1e-6)
    if top_k:
        kth = jax.lax.top_k(scaled, top_k)[0][-1]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    sampled = jax.random.categorical(key, scaled)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def window_generate(params, cfg, prompt, max_new_tokens, *, temperature=0.8, top_k=40, key=None, router_state=None):
    """Continue `prompt` by `max_new_tokens` tokens; each step runs the model on the last
    cfg.max_seq_len tokens (temperature 0 is greedy)."""
    tokens = [int(t) for t in prompt] or [ord("\n")]
    key = jax.random.key(0) if key is None else key
    S = cfg.max_seq_len
    out = []
    for i in range(max_new_tokens):
        ctx = tokens[-S:]
        buf = np.zeros((1, S), np.int32)
        buf[0, : len(ctx)] = ctx
        tok = _next_token(
            params, router_state, jnp.asarray(buf), jnp.int32(len(ctx)), jax.random.fold_in(key, i),
            jnp.float32(temperature), cfg, top_k or 0,
        )
        tokens.append(int(tok))
        out.append(int(tok))
    return out


# ---------------------------------------------------------------- timing helpers


def leading_matches(a, b) -> int:
    """Leading tokens that two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def hf_generate(model, ids, new: int, cache: str, *, check: bool = False):
    """transformers' greedy `generate` of `new` tokens after ids [B, P]; with `check`, the
    [B, new] token ids (numpy) and the class of the cache it used."""
    import torch

    x = torch.tensor(ids)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=check, cache_implementation=None if cache == "dynamic" else cache)
    if check:
        return out.sequences[:, ids.shape[1]:].numpy(), type(out.past_key_values).__name__


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def expert_layout(engine) -> str:
    """"split" when the engine holds its experts as an `ExpertList`, else "stacked"."""
    from jmoe.experts import ExpertList

    layer = engine.params["layers"][str(engine.cfg.moe_layers[0])]["moe"]
    return "split" if isinstance(layer.get("experts"), ExpertList) else "stacked"


def dispatch_of(moe, num_tokens: int, layout: str) -> str:
    """The MoE dispatch (and its options) the engine runs a step of `num_tokens` tokens with."""
    served = serving_moe(moe, num_tokens, split=layout == "split")
    return f"{served.dispatch} {served.dispatch_options}"


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


# ---------------------------------------------------------------- one model, one batch (CPU)


def bench_case(arch, model, engine, cfg, params, state, prompts, args) -> dict:
    B, P = prompts.shape
    N, W = args.new_tokens, args.window_tokens
    layout = expert_layout(engine)
    case = {"model": arch, "batch": B, "prompt_tokens": P, "new_tokens": N, "jmoe_expert_layout": layout,
            "jmoe_dispatch": {"prefill": dispatch_of(cfg.moe, B * P, layout), "decode": dispatch_of(cfg.moe, B, layout)}}
    print(f"[{arch} B={B}] compile and check", flush=True)

    # -- jmoe: the first call compiles this bucket
    gens, stats = engine.generate(prompts.tolist(), max_new_tokens=N)
    ours = [list(g.token_ids) for g in gens]
    case["jmoe_compile_s"] = stats.compile_s

    # -- transformers, both caches (first calls warm up)
    theirs, cache_class = {}, {}
    for cache in CACHES:
        try:
            hf_generate(model, prompts, 1, cache)
            theirs[cache], cache_class[cache] = hf_generate(model, prompts, N, cache, check=True)
        except Exception as e:  # noqa: BLE001 - an architecture without a static cache
            print(f"  transformers cache {cache!r} failed: {type(e).__name__}: {e}", flush=True)
            case[f"transformers_{cache}_error"] = f"{type(e).__name__}: {e}"
    caches = [c for c in CACHES if c in theirs]
    case["transformers_cache_class"] = cache_class

    # -- window: the old path, prompt 0 (compile on a first token)
    wcfg = cfg.replace(max_seq_len=P + N)  # the smallest window that holds the whole generation
    window_generate(params, wcfg, prompts[0], 1, temperature=0.0, top_k=None, router_state=state)
    window_tokens = window_generate(params, wcfg, prompts[0], W, temperature=0.0, top_k=None, router_state=state)

    # -- agreement (leading matching tokens per prompt)
    agree = {f"jmoe_vs_transformers_{c}": [leading_matches(ours[r], theirs[c][r].tolist()) for r in range(B)]
             for c in caches}
    if len(caches) == 2:
        agree["transformers_static_vs_dynamic"] = [leading_matches(theirs["static"][r].tolist(),
                                                                   theirs["dynamic"][r].tolist()) for r in range(B)]
    agree["jmoe_vs_window_prompt0"] = leading_matches(ours[0], window_tokens)
    agree["of"] = {"transformers": N, "window": W}
    case["agreement"] = agree
    case["tokens_prompt0"] = {"jmoe": ours[0], "window": window_tokens,
                              **{f"transformers_{c}": theirs[c][0].tolist() for c in caches}}
    for name, v in agree.items():
        if name != "of":
            print(f"  agreement {name}: {v}", flush=True)

    # -- timing: each repeat runs every framework once
    j_pre, j_dec, j_stats = [], [], []
    hf_t = {c: {"prefill": [], "full": []} for c in caches}
    for r in range(args.repeats):
        _, st = engine.generate(prompts.tolist(), max_new_tokens=N)
        j_stats.append(st.to_dict())
        j_pre.append(st.prefill_tokens_per_s)
        j_dec.append(st.decode_tokens_per_s)
        for c in caches:
            hf_t[c]["prefill"].append(timed(lambda: hf_generate(model, prompts, 1, c))[1])
            hf_t[c]["full"].append(timed(lambda: hf_generate(model, prompts, N, c))[1])
        print(f"  repeat {r + 1}/{args.repeats}: jmoe decode {j_dec[-1]:.1f} tok/s; " + "; ".join(
            f"transformers {c} {B * (N - 1) / max(hf_t[c]['full'][-1] - hf_t[c]['prefill'][-1], 1e-9):.1f}"
            for c in caches), flush=True)
    case["jmoe"] = {"prefill_tokens_per_s": statistics.median(j_pre), "decode_tokens_per_s": statistics.median(j_dec),
                    "stats": j_stats}
    case["transformers"] = {}
    for c in caches:
        pre, full = statistics.median(hf_t[c]["prefill"]), statistics.median(hf_t[c]["full"])
        dec_s = full - pre
        case["transformers"][c] = {
            "cache_class": cache_class[c], "prefill_s": pre, "generate_s": full, "decode_s": dec_s,
            "prefill_tokens_per_s": B * P / pre, "decode_tokens_per_s": B * (N - 1) / dec_s if dec_s > 0 else None,
            "prefill_s_all": hf_t[c]["prefill"], "generate_s_all": hf_t[c]["full"],
        }

    # -- window timing: batch 1 repeated; batch B runs the B prompts one after another, once
    if B == 1:
        wt = [timed(lambda: window_generate(params, wcfg, prompts[0], W, temperature=0.0, top_k=None,
                                            router_state=state))[1] for _ in range(args.repeats)]
        w_s = statistics.median(wt)
    else:
        wt = [timed(lambda: [window_generate(params, wcfg, p, W, temperature=0.0, top_k=None, router_state=state)
                             for p in prompts])[1]]
        w_s = wt[0]
    case["window"] = {"window_len": P + N, "new_tokens": W, "seconds": w_s, "seconds_all": wt,
                      "tokens_per_s": B * W / w_s}

    # -- ratios and the goal
    best = max(caches, key=lambda c: case["transformers"][c]["decode_tokens_per_s"] or 0.0) if caches else None
    jd = case["jmoe"]["decode_tokens_per_s"]
    case["transformers_best_cache"] = best
    if best is not None:
        td = case["transformers"][best]["decode_tokens_per_s"]
        case["decode_ratio_jmoe_over_transformers"] = jd / td
        case["prefill_ratio_jmoe_over_transformers"] = (case["jmoe"]["prefill_tokens_per_s"]
                                                        / case["transformers"][best]["prefill_tokens_per_s"])
        case["goal_met"] = jd / td >= GOAL
    case["decode_ratio_jmoe_over_window"] = jd / case["window"]["tokens_per_s"]
    return case


def table(cases) -> str:
    head = (f"{'model':<12} {'batch':>5}  {'framework':<24} {'prefill tok/s':>13} {'decode tok/s':>12}  "
            f"{'jmoe/transformers':>17} {'jmoe/window':>11}")
    lines = [head, "-" * len(head)]
    for c in cases:
        ratio = c.get("decode_ratio_jmoe_over_transformers")
        goal = "" if ratio is None else (" met" if c["goal_met"] else " NOT met")
        lines.append(f"{c['model']:<12} {c['batch']:>5}  {'jmoe':<24} {fmt(c['jmoe']['prefill_tokens_per_s']):>13} "
                     f"{fmt(c['jmoe']['decode_tokens_per_s']):>12}  {fmt(ratio, '.2f') + goal:>17} "
                     f"{fmt(c['decode_ratio_jmoe_over_window'], '.1f'):>11}")
        for cache, t in c["transformers"].items():
            name = f"transformers {cache}" + (" *" if cache == c["transformers_best_cache"] else "")
            lines.append(f"{'':<12} {'':>5}  {name:<24} {fmt(t['prefill_tokens_per_s']):>13} "
                         f"{fmt(t['decode_tokens_per_s']):>12}")
        w = c["window"]
        lines.append(f"{'':<12} {'':>5}  {'window (' + str(w['new_tokens']) + ' new tokens)':<24} {'-':>13} "
                     f"{fmt(w['tokens_per_s'], '.2f'):>12}")
    lines.append(f"(* the transformers cache compared; goal: jmoe decode >= {GOAL}x transformers)")
    return "\n".join(lines)


def run_cpu(args) -> dict:
    import torch
    import transformers as T

    from jmoe.io import hf

    T.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    models, cases = {}, []
    with tempfile.TemporaryDirectory() as root:
        for arch, hf_cfg in hf_configs(args.quick).items():
            if args.models and arch not in args.models:
                continue
            model, path = build(arch, hf_cfg, root)
            cfg, params = hf.load(path)
            state = lm_state_from_params(cfg, params)
            total, active = cfg.num_params(), cfg.num_params(active=True)
            hf_total = model.num_parameters()
            print(f"{arch}: {total:,} parameters ({active:,} active per token; transformers counts {hf_total:,}); "
                  f"transformers experts implementation {model.config._experts_implementation!r}, "
                  f"attention {model.config._attn_implementation!r}", flush=True)
            models[arch] = {"shapes": shapes_of(cfg), "params_total": total, "params_active": active,
                            "params_transformers": hf_total,
                            "transformers_experts_implementation": model.config._experts_implementation,
                            "transformers_attn_implementation": model.config._attn_implementation}
            prompts = rng.integers(0, cfg.vocab_size, (max(args.batches), args.prompt_tokens))
            engine = Engine(cfg, params, state, batch_size=max(args.batches))
            for B in args.batches:
                cases.append(bench_case(arch, model, engine, cfg, params, state, prompts[:B], args))
            del model, engine
    return {"models": models, "cases": cases}


# ---------------------------------------------------------------- --gpu: a Mixtral-shaped model


def gpu_config(n_layers: int, quick: bool) -> LMConfig:
    from jmoe.config import MoEConfig

    if quick:
        d, f, V, H, Hkv = 64, 128, 256, 4, 2
    else:
        d, f, V, H, Hkv = 4096, 14336, 32000, 32, 8
    moe = MoEConfig(d_model=d, num_experts=8, top_k=2, d_ff=f, router="topk", router_options=dict(renormalize=True),
                    dtype="bfloat16", param_dtype="bfloat16")
    cfg = LMConfig(vocab_size=V, d_model=d, n_layers=n_layers, n_heads=H, n_kv_heads=Hkv, d_ff=f, moe=moe,
                   max_seq_len=4096, rope_theta=1e6, norm_eps=1e-5)
    return cfg.replace(param_dtype="bfloat16", dtype="bfloat16")


def layer_bytes(cfg: LMConfig) -> dict:
    """Bytes of one layer's weights by part, and of the model's embedding and unembedding."""
    shapes = jax.eval_shape(lambda: init_lm(jax.random.key(0), cfg.replace(n_layers=1)))

    def nbytes(tree):
        return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))

    layer = shapes["layers"]["0"]
    moe = layer["moe"]
    out = {"attention": nbytes(layer["attn"]) + nbytes(layer["attn_norm"]) + nbytes(layer["ffn_norm"]),
           "router": nbytes(moe["router"]), "experts": nbytes(moe["experts"]),
           "moe_other": nbytes({k: v for k, v in moe.items() if k not in ("router", "experts")})}
    out["layer"] = nbytes(layer)
    out["one_expert"] = out["experts"] // cfg.moe.num_experts
    out["embed"] = nbytes(shapes["embed"])
    out["unembed"] = nbytes(shapes.get("unembed", shapes["embed"])) + nbytes(shapes["final_norm"])
    return out


def init_layers(cfg: LMConfig, seed: int = 0) -> dict:
    """`init_lm` one layer at a time (peak memory: the model plus one layer's initialisation),
    assembled into the parameters of the whole model."""
    one = cfg.replace(n_layers=1)
    params = None
    for i in range(cfg.n_layers):
        p = init_lm(jax.random.fold_in(jax.random.key(seed), i), one)
        if params is None:
            params = {k: v for k, v in p.items() if k != "layers"}
            params["layers"] = {}
        params["layers"][str(i)] = p["layers"]["0"]
        jax.block_until_ready(params["layers"][str(i)])
        del p
    return params


def step_bytes(cfg: LMConfig, lb: dict, B: int, live_len: float, full_len: int) -> dict:
    """Bytes one decode step of B rows must read: every layer's attention and router, the
    distinct experts selected (k at B=1; the expected number E (1 - (1 - k/E)^B) of distinct
    experts under uniform routing otherwise), B embedding rows, the unembedding, and the
    live part of the KV cache (average length over the decode; the static cache is larger)."""
    E, k, L = cfg.moe.num_experts, cfg.moe.top_k, cfg.n_layers
    distinct = k if B == 1 else E * (1 - (1 - k / E) ** B)
    item = jnp.dtype(cfg.dtype).itemsize
    kv_per_pos = 2 * cfg.kv_heads * cfg.head_dim * item * L
    parts = {"attention": L * lb["attention"], "router": L * (lb["router"] + lb["moe_other"]),
             "experts": L * distinct * lb["one_expert"], "embed_rows": B * cfg.d_model * item,
             "unembed": lb["unembed"], "kv_cache_live": B * live_len * kv_per_pos}
    return {"distinct_experts_per_layer": distinct, "parts": parts, "total": sum(parts.values()),
            "kv_cache_static_buffer": B * full_len * kv_per_pos}


def run_gpu(args) -> dict:
    dev = jax.devices()[0]
    kind, plat = dev.device_kind, dev.platform
    print(f"device: {kind} ({plat}), jax {jax.__version__}", flush=True)
    bandwidth = next((bw for name, bw in HBM_BYTES_PER_S.items() if name in kind), None)
    lb = layer_bytes(gpu_config(1, args.quick))
    budget = args.weights_gb * 1e9
    try:
        limit = (dev.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - platforms without memory stats
        limit = None
    if limit and plat != "cpu":
        budget = min(budget, 0.85 * limit)  # leave room for the cache and the compiled steps (H100: 80 GB)
    n_layers = 2 if args.quick else max(1, int((budget - lb["embed"] - lb["unembed"]) // lb["layer"]))
    cfg = gpu_config(n_layers, args.quick)
    weights = lb["embed"] + lb["unembed"] + n_layers * lb["layer"]
    print(f"{n_layers} layers of {lb['layer'] / 1e6:,.1f} MB: {weights / 1e9:.2f} GB of weights "
          f"({cfg.num_params():,} parameters, {cfg.num_params(active=True):,} active)", flush=True)
    params, t_init = timed(lambda: init_layers(cfg))
    print(f"initialised in {t_init:.0f} s", flush=True)
    engine = Engine(cfg, params, None, batch_size=max(args.gpu_batches))
    rng = np.random.default_rng(0)
    P, N = args.prompt_tokens, args.new_tokens
    prompts = rng.integers(0, cfg.vocab_size, (max(args.gpu_batches), P))
    cases = []
    for B in args.gpu_batches:
        _, st0 = engine.generate(prompts[:B].tolist(), max_new_tokens=N)
        runs = [engine.generate(prompts[:B].tolist(), max_new_tokens=N)[1].to_dict() for _ in range(args.repeats)]
        dec = statistics.median(r["decode_tokens_per_s"] for r in runs)
        pre = statistics.median(r["prefill_tokens_per_s"] for r in runs)
        step_s = B / dec  # one decode step produces B tokens
        prompt_bucket = min(max(MIN_PROMPT_BUCKET, 1 << (P - 1).bit_length()), cfg.max_seq_len)
        cache_len = min(max(prompt_bucket, length_bucket(P + N)), cfg.max_seq_len)  # the engine's bucket
        by = step_bytes(cfg, lb, B, P + N / 2, cache_len)
        share = by["total"] / step_s / bandwidth if (bandwidth and plat != "cpu") else None
        case = {"batch": B, "prompt_tokens": P, "new_tokens": N, "compile_s": st0.compile_s,
                "jmoe_expert_layout": expert_layout(engine),
                "jmoe_dispatch": {"prefill": dispatch_of(cfg.moe, B * P, expert_layout(engine)),
                                  "decode": dispatch_of(cfg.moe, B, expert_layout(engine))},
                "prefill_tokens_per_s": pre, "decode_tokens_per_s": dec, "decode_step_s": step_s,
                "bytes_per_step": by, "achieved_bytes_per_s": by["total"] / step_s, "device_bytes_per_s": bandwidth,
                "bandwidth_share": share, "runs": runs}
        print(f"B={B:>3}: prefill {pre:,.0f} tok/s, decode {dec:,.1f} tok/s ({step_s * 1e3:.2f} ms/step), "
              f"{by['total'] / 1e9:.2f} GB/step -> {by['total'] / step_s / 1e9:,.0f} GB/s"
              + (f" = {share:.1%} of {bandwidth / 1e12:.2f} TB/s" if share is not None else
                 " (no bandwidth share: " + ("cpu" if plat == "cpu" else f"unknown device {kind!r}") + ")"),
              flush=True)
        cases.append(case)
    return {"device_kind": kind, "platform": plat, "n_layers": n_layers, "weights_bytes": weights,
            "layer_bytes": lb, "params_total": cfg.num_params(), "params_active": cfg.num_params(active=True),
            "init_s": t_init, "shapes": shapes_of(cfg), "cases": cases}


# ---------------------------------------------------------------- main


def source_fingerprint() -> dict:
    """The jmoe code measured: the git commit, the files changed from it, and a hash of every
    jmoe/*.py file's contents (the working tree may differ from the commit)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for f in sorted((root / "jmoe").rglob("*.py")):
        digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    out = {"jmoe_sources_sha256": digest.hexdigest()}
    try:
        git = partial(subprocess.run, cwd=root, capture_output=True, text=True, check=True)
        out["git_commit"] = git(["git", "rev-parse", "HEAD"]).stdout.strip()
        out["git_changed"] = git(["git", "status", "--porcelain", "--", "jmoe"]).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def versions() -> dict:
    out = {"jax": jax.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "cpus": len(os.sched_getaffinity(0)), **source_fingerprint()}
    for name in ("jaxlib", "flax", "torch", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 8 prompt tokens, 8 new tokens")
    ap.add_argument("--gpu", action="store_true", help="the Mixtral-shaped bf16 model on one GPU")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses the machine's cores)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default 128 (--quick: 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (--quick: 8)")
    ap.add_argument("--window-tokens", type=int, default=None, help="new tokens of the window path (default 16; "
                                                                     "--quick: 4)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--gpu-batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--weights-gb", type=float, default=120.0, help="--gpu: weight budget that sets the layer count")
    ap.add_argument("--models", nargs="+", choices=["mixtral", "deepseek_v3"], default=None)
    ap.add_argument("--out", type=Path, default=None,
                    help="where the JSON goes (default results/bench_decode[_gpu].json; --quick: not written)")
    args = ap.parse_args(argv)
    args.prompt_tokens = args.prompt_tokens or (8 if args.quick else 128)
    args.new_tokens = args.new_tokens or (8 if args.quick else 128)
    args.window_tokens = args.window_tokens or (4 if args.quick else 16)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (decode = generate(N) - generate(1))")
    command = "python experiments/bench_decode.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    load_before = os.getloadavg()

    if args.gpu:
        out = {"command": command.strip(), **versions(), **run_gpu(args)}
        default_out = GPU_RESULTS if jax.devices()[0].platform != "cpu" and not args.quick else None
    else:
        res = run_cpu(args)
        cases = res["cases"]
        print()
        print(table(cases))
        judged = [c for c in cases if "goal_met" in c]
        verdict = (f"goal (jmoe decode >= {GOAL}x transformers' best cache at batch "
                   f"{', '.join(map(str, args.batches))}): "
                   + ("met" if judged and all(c["goal_met"] for c in judged) else "NOT met") + " — "
                   + ", ".join(f"{c['model']} B={c['batch']}: {c['decode_ratio_jmoe_over_transformers']:.2f}x "
                               f"({'met' if c['goal_met'] else 'not met'})" for c in judged))
        print(verdict)
        out = {"command": command.strip(), **versions(), "threads": args.threads,
               "xla_flags": os.environ.get("XLA_FLAGS", ""), "goal": f"jmoe decode tokens/s >= {GOAL}x transformers' "
               "(its faster cache) at every batch", "verdict": verdict,
               "goal_per_case": {f"{c['model']}/B={c['batch']}": c.get("goal_met") for c in cases},
               "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
               "window_tokens": args.window_tokens, "repeats": args.repeats,
               "decode_tokens_counted": "B * (new_tokens - 1) for jmoe and transformers (the prefill gives the "
                                        "first token)", **res}
        default_out = None if args.quick else RESULTS
    out["total_s"] = time.perf_counter() - t0
    out["loadavg_before"], out["loadavg_after"] = load_before, os.getloadavg()
    text = json.dumps(out, indent=1)
    dest = args.out or default_out
    print(f"total {out['total_s']:.0f} s (load average before {load_before[0]:.2f}, "
          f"after {out['loadavg_after'][0]:.2f})")
    if dest is None:
        print(f"not written ({'--quick' if args.quick else 'no GPU'}; pass --out to write {len(text):,} characters)")
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        print(f"wrote {dest}")


if __name__ == "__main__":
    main()
