"""One entry per Hugging Face architecture (the MoE ones and the dense Llama, Mistral, Qwen2
and Qwen3): how its config maps to `LMConfig`, and a tensor table that maps its checkpoint names to jmoe parameter paths.

A table row is (condition, hf_name, jmoe_path, transform):
  condition   when the row applies: "all", "moe" / "dense" layers, "gqa" / "mla", "q_lora" /
              "q_full" (MLA query projection), "qk_norm", "qkv_bias", "shared", "shared_gate",
              "router_bias", "untied" (a separate lm_head), "layer" rows repeat per layer
  hf_name     with {i} (layer) and {e} (expert)
  jmoe_path   "/"-separated path in the jmoe tree, with {i}
  transform   "copy" (vectors), "T" ([out, in] -> [in, out]), "T_in:<heads>" (-> [in, heads, -1]),
              "T_out:<heads>" (-> [heads, -1, out]), "bias:<heads>" ([heads * D] -> [heads, D]),
              "experts" (per-expert [out, in] matrices -> [E, in, out])
The layers never see architecture names: everything architecture-specific is here.
"""

from __future__ import annotations

import json
from typing import Any

from jmoe.config import MoEConfig
from jmoe.nn.attention import AttentionConfig, yarn_mscale
from jmoe.nn.transformer import LMConfig

GQA_ROWS = [
    ("gqa", "model.layers.{i}.self_attn.q_proj.weight", "layers/{i}/attn/wq", "T_in:n_heads"),
    ("gqa", "model.layers.{i}.self_attn.k_proj.weight", "layers/{i}/attn/wk", "T_in:kv_heads"),
    ("gqa", "model.layers.{i}.self_attn.v_proj.weight", "layers/{i}/attn/wv", "T_in:kv_heads"),
    ("gqa", "model.layers.{i}.self_attn.o_proj.weight", "layers/{i}/attn/wo", "T_out:n_heads"),
    ("qkv_bias", "model.layers.{i}.self_attn.q_proj.bias", "layers/{i}/attn/bq", "bias:n_heads"),
    ("qkv_bias", "model.layers.{i}.self_attn.k_proj.bias", "layers/{i}/attn/bk", "bias:kv_heads"),
    ("qkv_bias", "model.layers.{i}.self_attn.v_proj.bias", "layers/{i}/attn/bv", "bias:kv_heads"),
    ("qk_norm", "model.layers.{i}.self_attn.q_norm.weight", "layers/{i}/attn/q_norm/scale", "copy"),
    ("qk_norm", "model.layers.{i}.self_attn.k_norm.weight", "layers/{i}/attn/k_norm/scale", "copy"),
]
MLA_ROWS = [
    ("q_full", "model.layers.{i}.self_attn.q_proj.weight", "layers/{i}/attn/wq", "T_in:n_heads"),
    ("q_lora", "model.layers.{i}.self_attn.q_a_proj.weight", "layers/{i}/attn/wq_a", "T"),
    ("q_lora", "model.layers.{i}.self_attn.q_a_layernorm.weight", "layers/{i}/attn/q_a_norm/scale", "copy"),
    ("q_lora", "model.layers.{i}.self_attn.q_b_proj.weight", "layers/{i}/attn/wq_b", "T_in:n_heads"),
    ("mla", "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight", "layers/{i}/attn/wkv_a", "T"),
    ("mla", "model.layers.{i}.self_attn.kv_a_layernorm.weight", "layers/{i}/attn/kv_a_norm/scale", "copy"),
    ("mla", "model.layers.{i}.self_attn.kv_b_proj.weight", "layers/{i}/attn/wkv_b", "T_in:n_heads"),
    ("mla", "model.layers.{i}.self_attn.o_proj.weight", "layers/{i}/attn/wo", "T_out:n_heads"),
]
COMMON_ROWS = [
    ("all", "model.embed_tokens.weight", "embed/w", "copy"),
    ("all", "model.norm.weight", "final_norm/scale", "copy"),
    ("untied", "lm_head.weight", "unembed/w", "T"),
    ("layer", "model.layers.{i}.input_layernorm.weight", "layers/{i}/attn_norm/scale", "copy"),
    ("layer", "model.layers.{i}.post_attention_layernorm.weight", "layers/{i}/ffn_norm/scale", "copy"),
]


def _ffn_rows(condition: str, prefix: str, path: str, names=("gate_proj", "up_proj", "down_proj")):
    g, u, d = names
    return [
        (condition, f"{prefix}.{g}.weight", f"{path}/w_gate", "T"),
        (condition, f"{prefix}.{u}.weight", f"{path}/w_up", "T"),
        (condition, f"{prefix}.{d}.weight", f"{path}/w_down", "T"),
    ]


def _expert_rows(prefix: str, names=("gate_proj", "up_proj", "down_proj")):
    g, u, d = names
    return [
        ("moe", f"{prefix}.experts.{{e}}.{g}.weight", "layers/{i}/moe/experts/w_gate", "experts"),
        ("moe", f"{prefix}.experts.{{e}}.{u}.weight", "layers/{i}/moe/experts/w_up", "experts"),
        ("moe", f"{prefix}.experts.{{e}}.{d}.weight", "layers/{i}/moe/experts/w_down", "experts"),
    ]


# ------------------------------------------------------------------- config helpers


def rope_settings(hf: dict) -> tuple[float, dict]:
    """(theta, scaling dict) from either the v5 `rope_parameters` or `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = params or dict(hf.get("rope_scaling") or {})
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = {}
    return theta, scaling


def context_length(hf: dict) -> int:
    """The longest sequence jmoe runs a checkpoint with: `max_position_embeddings`, or the
    attention window when the config slides one (within its window, sliding-window attention
    is plain causal attention, so every sequence jmoe accepts is computed exactly)."""
    length = int(hf.get("max_position_embeddings", 4096))
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window", True):
        length = min(length, int(window))
    return length


def _common(hf: dict) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf.get('hidden_act')!r} is not supported (silu only)")
    theta, scaling = rope_settings(hf)
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_head=hf.get("head_dim"), norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
        max_seq_len=context_length(hf), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    ), scaling


ALIASES = {"num_experts": ("num_local_experts", "n_routed_experts"), "num_local_experts": ("num_experts",),
           "n_routed_experts": ("num_local_experts", "num_experts")}


def _get(hf: dict, key: str, default=None):
    """hf[key], or the same setting under another name (configs of different versions)."""
    for k in (key, *ALIASES.get(key, ())):
        if hf.get(k) is not None:
            return hf[k]
    if default is not None:
        return default
    raise KeyError(f"config.json has no {key!r}")


def _moe(hf: dict, *, router: str, router_options: dict, **kw) -> MoEConfig:
    return MoEConfig(d_model=hf["hidden_size"], activation="swiglu", router=router, router_options=router_options, **kw)


def _meta(arch: str, hf: dict) -> tuple:
    return (("hf_architecture", arch), ("hf_config", json.dumps(hf, sort_keys=True)))


def _mla_attention(hf: dict, scaling: dict, interleave: bool) -> AttentionConfig:
    dqk = hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]
    scale = dqk**-0.5
    if scaling and scaling.get("mscale_all_dim"):
        m = yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
        scale = scale * m * m
    return AttentionConfig(
        kind="mla", q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        rope_scaling=scaling, rope_interleave=interleave, softmax_scale=scale,
    )


# -------------------------------------------------------------- per architecture


def mixtral(hf: dict) -> LMConfig:
    """`LMConfig` of a Mixtral config.json (softmax top-k router, renormalised weights)."""
    common, scaling = _common(hf)
    moe = _moe(hf, num_experts=_get(hf, "num_local_experts"), top_k=hf["num_experts_per_tok"], d_ff=hf["intermediate_size"],
               router="topk", router_options=dict(renormalize=True))
    return LMConfig(**common, d_ff=hf["intermediate_size"], moe=moe, attention=AttentionConfig(rope_scaling=scaling),
                    meta=_meta("MixtralForCausalLM", hf))


def qwen2_moe(hf: dict) -> LMConfig:
    """`LMConfig` of a Qwen2-MoE config.json (optional gated shared expert, dense `mlp_only_layers`)."""
    common, scaling = _common(hf)
    shared = hf.get("shared_expert_intermediate_size") or 0
    moe = _moe(hf, num_experts=_get(hf, "num_experts"), top_k=hf["num_experts_per_tok"], d_ff=hf["moe_intermediate_size"],
               router="topk", router_options=dict(renormalize=bool(hf.get("norm_topk_prob", False))),
               num_shared_experts=1 if shared else 0, d_ff_shared=shared or None, shared_gate=bool(shared))
    return LMConfig(**common, d_ff=hf["intermediate_size"], moe=moe, moe_every=hf.get("decoder_sparse_step", 1),
                    dense_layers=tuple(hf.get("mlp_only_layers") or ()),
                    attention=AttentionConfig(qkv_bias=bool(hf.get("qkv_bias", True)), rope_scaling=scaling),
                    meta=_meta("Qwen2MoeForCausalLM", hf))


def qwen3_moe(hf: dict) -> LMConfig:
    """`LMConfig` of a Qwen3-MoE config.json (per-head q/k norms, dense `mlp_only_layers`)."""
    common, scaling = _common(hf)
    moe = _moe(hf, num_experts=_get(hf, "num_experts"), top_k=hf["num_experts_per_tok"], d_ff=hf["moe_intermediate_size"],
               router="topk", router_options=dict(renormalize=bool(hf.get("norm_topk_prob", True))))
    return LMConfig(**common, d_ff=hf["intermediate_size"], moe=moe, moe_every=hf.get("decoder_sparse_step", 1),
                    dense_layers=tuple(hf.get("mlp_only_layers") or ()),
                    attention=AttentionConfig(qk_norm="head", qkv_bias=bool(hf.get("attention_bias", False)),
                                              rope_scaling=scaling),
                    meta=_meta("Qwen3MoeForCausalLM", hf))


def olmoe(hf: dict) -> LMConfig:
    """`LMConfig` of an OLMoE config.json (q/k norms over all heads, optional `clip_qkv`)."""
    common, scaling = _common(hf)
    moe = _moe(hf, num_experts=_get(hf, "num_experts"), top_k=hf["num_experts_per_tok"], d_ff=hf["intermediate_size"],
               router="topk", router_options=dict(renormalize=bool(hf.get("norm_topk_prob", False))))
    return LMConfig(**common, d_ff=hf["intermediate_size"], moe=moe,
                    attention=AttentionConfig(qk_norm="full", clip_qkv=hf.get("clip_qkv"), rope_scaling=scaling),
                    meta=_meta("OlmoeForCausalLM", hf))


def deepseek_v2(hf: dict) -> LMConfig:
    """`LMConfig` of a DeepSeek-V2 config.json (MLA attention, grouped softmax router, shared
    experts, the first `first_k_dense_replace` layers dense)."""
    common, scaling = _common(hf)
    groups = hf.get("n_group") or 1
    limited = hf.get("topk_method", "greedy") == "group_limited_greedy" and groups > 1
    moe = _moe(hf, num_experts=_get(hf, "n_routed_experts"), top_k=hf["num_experts_per_tok"], d_ff=hf["moe_intermediate_size"],
               router="grouped_softmax", router_options=dict(
                   renormalize=False, route_scale=float(hf.get("routed_scaling_factor", 1.0)),
                   expert_groups=groups if limited else 1, topk_groups=(hf.get("topk_group") or 1) if limited else 1),
               num_shared_experts=hf.get("n_shared_experts") or 0, d_ff_shared=hf["moe_intermediate_size"])
    common["n_kv_heads"] = common["n_heads"]
    return LMConfig(**common, d_ff=hf["intermediate_size"], moe=moe,
                    dense_layers=tuple(range(hf.get("first_k_dense_replace", 0))),
                    attention=_mla_attention(hf, scaling, interleave=True), meta=_meta("DeepseekV2ForCausalLM", hf))


def deepseek_v3(hf: dict) -> LMConfig:
    """`LMConfig` of a DeepSeek-V3 config.json (MLA attention, sigmoid router with selection bias
    and expert groups, shared experts, the first `first_k_dense_replace` layers dense)."""
    common, scaling = _common(hf)
    moe = _moe(hf, num_experts=_get(hf, "n_routed_experts"), top_k=hf["num_experts_per_tok"], d_ff=hf["moe_intermediate_size"],
               router="sigmoid_bias", router_options=dict(
                   renormalize=bool(hf.get("norm_topk_prob", True)), route_scale=float(hf.get("routed_scaling_factor", 1.0)),
                   expert_groups=hf.get("n_group") or 1, topk_groups=hf.get("topk_group") or 1),
               num_shared_experts=hf.get("n_shared_experts") or 0,
               d_ff_shared=hf["moe_intermediate_size"])
    common["n_kv_heads"] = common["n_heads"]
    return LMConfig(**common, d_ff=hf["intermediate_size"], moe=moe,
                    dense_layers=tuple(range(hf.get("first_k_dense_replace", 0))),
                    attention=_mla_attention(hf, scaling, interleave=bool(hf.get("rope_interleave", True))),
                    meta=_meta("DeepseekV3ForCausalLM", hf))


def llama(hf: dict) -> LMConfig:
    """`LMConfig` of a dense Llama config.json (no attention or MLP biases)."""
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"{key}=true is not supported for llama checkpoints")
    common, scaling = _common(hf)
    return LMConfig(**common, d_ff=hf["intermediate_size"], attention=AttentionConfig(rope_scaling=scaling),
                    meta=_meta("LlamaForCausalLM", hf))


def mistral(hf: dict) -> LMConfig:
    """`LMConfig` of a dense Mistral config.json (a sliding window bounds the context length)."""
    common, scaling = _common(hf)
    return LMConfig(**common, d_ff=hf["intermediate_size"], attention=AttentionConfig(rope_scaling=scaling),
                    meta=_meta("MistralForCausalLM", hf))


def qwen2(hf: dict) -> LMConfig:
    """`LMConfig` of a dense Qwen2 config.json (biases on the q, k and v projections)."""
    common, scaling = _common(hf)
    return LMConfig(**common, d_ff=hf["intermediate_size"], attention=AttentionConfig(qkv_bias=True, rope_scaling=scaling),
                    meta=_meta("Qwen2ForCausalLM", hf))


def qwen3(hf: dict) -> LMConfig:
    """`LMConfig` of a dense Qwen3 config.json (per-head q/k norms)."""
    common, scaling = _common(hf)
    return LMConfig(**common, d_ff=hf["intermediate_size"],
                    attention=AttentionConfig(qk_norm="head", qkv_bias=bool(hf.get("attention_bias", False)),
                                              rope_scaling=scaling),
                    meta=_meta("Qwen3ForCausalLM", hf))


# hf config key -> how to read it back from an LMConfig (for save)
def _back_common(c: LMConfig) -> dict:
    original = json.loads(dict(c.meta).get("hf_config", "{}"))
    # a context bounded by a sliding window keeps the checkpoint's own max_position_embeddings
    positions = original["max_position_embeddings"] if original and context_length(original) == c.max_seq_len \
        else c.max_seq_len
    return {"vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.kv_heads, "rms_norm_eps": c.norm_eps,
            "max_position_embeddings": positions, "tie_word_embeddings": c.tie_embeddings}


def _back_dense(c: LMConfig) -> dict:
    if c.moe is not None:
        raise ValueError("a dense Hugging Face architecture cannot hold MoE layers; save with an MoE architecture")
    return {**_back_common(c), "intermediate_size": c.d_ff, "head_dim": c.head_dim}


DENSE_ROWS = COMMON_ROWS + GQA_ROWS + _ffn_rows("dense", "model.layers.{i}.mlp", "layers/{i}/ffn")


ARCHITECTURES: dict[str, dict[str, Any]] = {
    "mixtral": {
        "class": "MixtralForCausalLM",
        "config": mixtral,
        "back": lambda c: {**_back_common(c), "num_local_experts": c.moe.num_experts, "num_experts_per_tok": c.moe.top_k,
                           "intermediate_size": c.moe.d_ff},
        "rows": COMMON_ROWS + GQA_ROWS + [
            ("moe", "model.layers.{i}.block_sparse_moe.gate.weight", "layers/{i}/moe/router/w", "T"),
            *_expert_rows("model.layers.{i}.block_sparse_moe", ("w1", "w3", "w2")),
        ],
    },
    "qwen2_moe": {
        "class": "Qwen2MoeForCausalLM",
        "config": qwen2_moe,
        "back": lambda c: {**_back_common(c), "num_experts": c.moe.num_experts, "num_experts_per_tok": c.moe.top_k,
                           "moe_intermediate_size": c.moe.d_ff, "intermediate_size": c.d_ff,
                           "shared_expert_intermediate_size": c.moe.shared_d_ff},
        "rows": COMMON_ROWS + GQA_ROWS + [
            ("moe", "model.layers.{i}.mlp.gate.weight", "layers/{i}/moe/router/w", "T"),
            *_expert_rows("model.layers.{i}.mlp"),
            *_ffn_rows("shared", "model.layers.{i}.mlp.shared_expert", "layers/{i}/moe/shared"),
            ("shared_gate", "model.layers.{i}.mlp.shared_expert_gate.weight", "layers/{i}/moe/shared_gate/w", "T"),
            *_ffn_rows("dense", "model.layers.{i}.mlp", "layers/{i}/ffn"),
        ],
    },
    "qwen3_moe": {
        "class": "Qwen3MoeForCausalLM",
        "config": qwen3_moe,
        "back": lambda c: {**_back_common(c), "num_experts": c.moe.num_experts, "num_experts_per_tok": c.moe.top_k,
                           "moe_intermediate_size": c.moe.d_ff, "intermediate_size": c.d_ff, "head_dim": c.head_dim},
        "rows": COMMON_ROWS + GQA_ROWS + [
            ("moe", "model.layers.{i}.mlp.gate.weight", "layers/{i}/moe/router/w", "T"),
            *_expert_rows("model.layers.{i}.mlp"),
            *_ffn_rows("dense", "model.layers.{i}.mlp", "layers/{i}/ffn"),
        ],
    },
    "olmoe": {
        "class": "OlmoeForCausalLM",
        "config": olmoe,
        "back": lambda c: {**_back_common(c), "num_experts": c.moe.num_experts, "num_experts_per_tok": c.moe.top_k,
                           "intermediate_size": c.moe.d_ff},
        "rows": COMMON_ROWS + GQA_ROWS + [
            ("moe", "model.layers.{i}.mlp.gate.weight", "layers/{i}/moe/router/w", "T"),
            *_expert_rows("model.layers.{i}.mlp"),
        ],
    },
    "deepseek_v2": {
        "class": "DeepseekV2ForCausalLM",
        "config": deepseek_v2,
        "back": lambda c: {**_back_common(c), "n_routed_experts": c.moe.num_experts, "num_experts_per_tok": c.moe.top_k,
                           "moe_intermediate_size": c.moe.d_ff, "intermediate_size": c.d_ff},
        "rows": COMMON_ROWS + MLA_ROWS + [
            ("moe", "model.layers.{i}.mlp.gate.weight", "layers/{i}/moe/router/w", "T"),
            *_expert_rows("model.layers.{i}.mlp"),
            *_ffn_rows("shared", "model.layers.{i}.mlp.shared_experts", "layers/{i}/moe/shared"),
            *_ffn_rows("dense", "model.layers.{i}.mlp", "layers/{i}/ffn"),
        ],
    },
    "deepseek_v3": {
        "class": "DeepseekV3ForCausalLM",
        "config": deepseek_v3,
        "back": lambda c: {**_back_common(c), "n_routed_experts": c.moe.num_experts, "num_experts_per_tok": c.moe.top_k,
                           "moe_intermediate_size": c.moe.d_ff, "intermediate_size": c.d_ff},
        "rows": COMMON_ROWS + MLA_ROWS + [
            ("moe", "model.layers.{i}.mlp.gate.weight", "layers/{i}/moe/router/w", "T"),
            ("router_bias", "model.layers.{i}.mlp.gate.e_score_correction_bias", "layers/{i}/moe/router/bias", "copy"),
            *_expert_rows("model.layers.{i}.mlp"),
            *_ffn_rows("shared", "model.layers.{i}.mlp.shared_experts", "layers/{i}/moe/shared"),
            *_ffn_rows("dense", "model.layers.{i}.mlp", "layers/{i}/ffn"),
        ],
    },
    "llama": {"class": "LlamaForCausalLM", "config": llama, "back": _back_dense, "rows": DENSE_ROWS},
    "mistral": {"class": "MistralForCausalLM", "config": mistral, "back": _back_dense, "rows": DENSE_ROWS},
    "qwen2": {"class": "Qwen2ForCausalLM", "config": qwen2, "back": _back_dense, "rows": DENSE_ROWS},
    "qwen3": {"class": "Qwen3ForCausalLM", "config": qwen3, "back": _back_dense, "rows": DENSE_ROWS},
}
DENSE_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
CLASS_TO_TYPE = {v["class"]: k for k, v in ARCHITECTURES.items()}


def architecture_of(hf: dict) -> str:
    """The jmoe architecture key of a Hugging Face config (ValueError listing the supported ones)."""
    model_type = hf.get("model_type")
    if model_type in ARCHITECTURES:
        return model_type
    for cls in hf.get("architectures") or []:
        if cls in CLASS_TO_TYPE:
            return CLASS_TO_TYPE[cls]
    supported = ", ".join(f"{k} ({v['class']})" for k, v in ARCHITECTURES.items())
    raise ValueError(f"unsupported architecture (model_type={model_type!r}, architectures={hf.get('architectures')}); "
                     f"supported: {supported}")


def conditions(cfg: LMConfig, layer: int | None) -> set[str]:
    """The table conditions that hold for a layer (None: outside the layers)."""
    a = cfg.attention
    on = {"all"}
    if not cfg.tie_embeddings:
        on.add("untied")
    if layer is None:
        return on
    on |= {"layer", a.kind}
    if a.kind == "gqa":
        if a.qk_norm:
            on.add("qk_norm")
        if a.qkv_bias:
            on.add("qkv_bias")
    else:
        on.add("q_lora" if a.q_lora_rank else "q_full")
    if cfg.is_moe_layer(layer):
        moe = cfg.moe_for(layer)
        on.add("moe")
        if moe.num_shared_experts:
            on.add("shared")
            if moe.shared_gate:
                on.add("shared_gate")
        if moe.router == "sigmoid_bias":
            on.add("router_bias")
    else:
        on.add("dense")
    return on


