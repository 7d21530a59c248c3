"""`jmoe moe-build`: an MoE model built from dense models, as mergekit-moe builds one.

Each expert of every layer is the FFN of one dense model (a fine-tune of the base, or the base
itself: sparse upcycling); attention, norms and embeddings are the base model's; a new router
per layer is made from prompts that describe each expert. The configuration is mergekit-moe's
YAML:

  base_model: DIR                 # a dense Hugging Face directory (Llama, Mistral, Qwen2, Qwen3) or jmoe run
  gate_mode: hidden               # hidden | hidden_avg | cheap_embed | random | uniform_random
  experts_per_token: 2            # top-k (default 2)
  dtype: bfloat16                 # output dtype (default the base's)
  architecture: mixtral           # optional: mixtral | qwen2_moe | qwen3_moe | jmoe (default: the base's)
  attention_experts: full         # optional (BAM): each expert's attention too, as a soft mixture of
                                  #   attention experts; full | shared_kv (keys and values averaged)
  non_expert_params: base         # base | average: embeddings and norms (and the attention, without
                                  #   attention experts) from the base, or averaged over the experts' models
  experts:
    - source_model: DIR
      positive_prompts: ["..."]   # needed by the hidden and cheap_embed gates
      negative_prompts: ["..."]   # optional
      noise_scale: 0.01           # optional: + N(0, noise_scale) on this expert's FFN weights
      residual_scale: 0.5         # optional: scale this expert's down projection
  shared_experts:                 # optional, at most one (qwen2_moe: needs prompts for its gate)
    - source_model: DIR

Router rows (mergekit's `get_gate_params`), one unit vector per expert and layer:
  hidden       the residual stream entering the layer at each prompt's last token (after a
               BOS, when the tokenizer has one), averaged over the prompts
  hidden_avg   the same, averaged over each prompt's tokens (padding excluded)
  cheap_embed  the sum of the prompts' token embeddings, the same for every layer
  random       N(0, 1) entries (not normalised); uniform_random: U(-1/sqrt(d), 1/sqrt(d))
With negative prompts a row is f(positive) - f(negative); rows are then L2-normalised.

Outputs: Mixtral (Llama or Mistral bases), Qwen2-MoE (Qwen2 bases and one gated shared
expert), Qwen3-MoE (Qwen3 bases) as Hugging Face directories with the base's tokenizer; a
jmoe run for a jmoe base or when asked (`architecture: jmoe`; a Hugging Face base's
tokenizer is copied into it). Its shared expert is gated when it has prompts, else always on.
Routing is renormalised softmax top-k in all of them.

BAM (Branch-Attend-Mix): with `attention_experts`, expert e's attention becomes attention
expert e of a soft mixture (`jmoe.nn.attention_experts`: every token attends with all of
them, mixed by a softmax router whose rows are the FFN router's), optionally with the experts'
keys and values averaged into shared ones (`shared_kv`, a KV cache as small as the base's).
No Hugging Face architecture holds attention experts, so the output is a jmoe run. BAM
averages the remaining parameters over the experts' models: `non_expert_params: average`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jmoe.experts import ffn
from jmoe.nn.attention import causal_attention
from jmoe.nn.transformer import LMConfig, attention_block, embed

GATE_MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")
TOP_KEYS = {"base_model", "gate_mode", "dtype", "experts_per_token", "architecture", "experts", "shared_experts", "name",
            "attention_experts", "non_expert_params"}
ATTENTION_EXPERTS = ("full", "shared_kv")
NON_EXPERT = ("base", "average")
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
DTYPES = ("float32", "float16", "bfloat16")
# output architecture -> the dense architectures it is built from
OUTPUTS = {"mixtral": ("llama", "mistral"), "qwen2_moe": ("qwen2",), "qwen3_moe": ("qwen3",),
           "jmoe": ("jmoe", "llama", "mistral", "qwen2", "qwen3")}
ALIASES = {"qwen": "qwen2_moe", "qwen3": "qwen3_moe"}  # mergekit's names


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
    source: Path
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    noise_scale: float = 0.0
    residual_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    base: Path
    gate_mode: str
    top_k: int
    dtype: str | None
    architecture: str | None
    experts: tuple[ExpertSpec, ...]
    shared: ExpertSpec | None
    raw: dict
    attention_experts: str | None = None
    non_expert: str = "base"


def _strings(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where} must be a list of non-empty strings")
    return tuple(value)


def _number(value, where: str, default: float, lo: float | None = None) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"{where} must be a number, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{where}={value} must be >= {lo}")
    return float(value)


def _expert(entry, where: str, root: Path, needs_prompts: bool) -> ExpertSpec:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a mapping with source_model")
    unknown = sorted(set(entry) - EXPERT_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(EXPERT_KEYS))}")
    if not isinstance(entry.get("source_model"), str):
        raise ValueError(f"{where}.source_model must be a model directory")
    source = root / Path(entry["source_model"]).expanduser()
    if not source.is_dir():
        raise ValueError(f"{where}.source_model {entry['source_model']!r} is not a directory")
    positive = _strings(entry.get("positive_prompts"), f"{where}.positive_prompts")
    if needs_prompts and not positive:
        raise ValueError(f"{where} needs positive_prompts (gate_mode needs them; only random gates do not)")
    return ExpertSpec(source=source, positive=positive,
                      negative=_strings(entry.get("negative_prompts"), f"{where}.negative_prompts"),
                      noise_scale=_number(entry.get("noise_scale"), f"{where}.noise_scale", 0.0, lo=0.0),
                      residual_scale=_number(entry.get("residual_scale"), f"{where}.residual_scale", 1.0))


def parse_build_config(path: str | Path, *, allow_identical: bool = False) -> BuildPlan:
    """The plan of a moe-build YAML file; ValueError (one line, naming the key) when anything
    is wrong. Relative model paths are read from the file's directory."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"moe-build configuration {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping (base_model, experts, ...)")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(TOP_KEYS))}")
    root = path.parent
    if not isinstance(raw.get("base_model"), str):
        raise ValueError(f"{path}: base_model must be a model directory")
    base = root / Path(raw["base_model"]).expanduser()
    if not base.is_dir():
        raise ValueError(f"{path}: base_model {raw['base_model']!r} is not a directory")
    mode = raw.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise ValueError(f"{path}: gate_mode {mode!r} is not one of {', '.join(GATE_MODES)}")
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"{path}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    arch = raw.get("architecture")
    if arch is not None:
        arch = ALIASES.get(arch, arch)
        if arch not in OUTPUTS:
            raise ValueError(f"{path}: architecture {raw['architecture']!r} is not one of {', '.join(OUTPUTS)}")
    entries = raw.get("experts")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: experts must be a non-empty list")
    needs_prompts = mode in ("hidden", "hidden_avg", "cheap_embed")
    experts = tuple(_expert(e, f"experts[{i}]", root, needs_prompts) for i, e in enumerate(entries))
    shared_entries = raw.get("shared_experts") or []
    if not isinstance(shared_entries, list) or len(shared_entries) > 1:
        raise ValueError(f"{path}: shared_experts must be a list of at most one expert")
    shared = _expert(shared_entries[0], "shared_experts[0]", root, False) if shared_entries else None
    k = raw.get("experts_per_token", 2)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(experts):
        raise ValueError(f"{path}: experts_per_token={k!r} must be an integer in [1, {len(experts)}] (the experts)")
    attention = raw.get("attention_experts")
    if attention is not None and attention not in ATTENTION_EXPERTS:
        raise ValueError(f"{path}: attention_experts {attention!r} is not one of {', '.join(ATTENTION_EXPERTS)}")
    if attention is not None and len(experts) < 2:
        raise ValueError(f"{path}: attention_experts needs at least two experts")
    if attention is not None and arch not in (None, "jmoe"):
        raise ValueError(f"{path}: attention_experts makes a model no Hugging Face architecture holds; set "
                         f"architecture to jmoe (or leave it out), not {raw['architecture']!r}")
    non_expert = raw.get("non_expert_params", "base")
    if non_expert not in NON_EXPERT:
        raise ValueError(f"{path}: non_expert_params {non_expert!r} is not one of {', '.join(NON_EXPERT)}")
    if not allow_identical and len(experts) > 1:
        if len({e.source.resolve() for e in experts}) == 1 and mode not in ("random", "uniform_random"):
            raise ValueError(f"{path}: every expert is {experts[0].source}: identical experts only differ after "
                             "training (pass --allow-identical to build it anyway, e.g. to upcycle)")
        if len({(e.positive, e.negative) for e in experts}) == 1 and needs_prompts:
            raise ValueError(f"{path}: every expert has the same prompts, so their router rows are equal "
                             "(pass --allow-identical to build it anyway)")
    return BuildPlan(base=base, gate_mode=mode, top_k=k, dtype=dtype, architecture=arch, experts=experts,
                     shared=shared, raw=raw, attention_experts=attention, non_expert=non_expert)


def upcycle_plan(model: str | Path, num_experts: int, *, top_k: int = 2, noise_scale: float = 0.0) -> BuildPlan:
    """The plan of sparse upcycling: every expert a copy of the dense `model`'s FFN (plus
    N(0, noise_scale) noise), under a freshly initialised router (U(-1/sqrt(d), 1/sqrt(d)),
    a linear layer's default)."""
    model = Path(model)
    if not model.is_dir():
        raise ValueError(f"--upcycle: {model} is not a model directory")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"--upcycle {num_experts!r} must be an integer >= 1 (the experts per layer)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"--top-k {top_k!r} must be an integer in [1, {num_experts}] (the experts)")
    _number(noise_scale, "--noise-scale", 0.0, lo=0.0)
    spec = ExpertSpec(source=model, noise_scale=float(noise_scale))
    raw = {"base_model": str(model), "gate_mode": "uniform_random", "experts_per_token": top_k,
           "experts": [{"source_model": str(model), "noise_scale": float(noise_scale)}] * num_experts}
    return BuildPlan(base=model, gate_mode="uniform_random", top_k=top_k, dtype=None, architecture=None,
                     experts=(spec,) * num_experts, shared=None, raw=raw)


# ------------------------------------------------------------------ reading the models


def _comparable(cfg: LMConfig) -> LMConfig:
    return cfg.replace(meta=(), param_dtype="float32")


def check_models(plan: BuildPlan) -> dict[str, Any]:
    """Open every model of the plan without reading weights and check that they are dense
    models of one shape; returns {"base": ModelSource, "arch": output architecture, "sources":
    {path: ModelSource}}. ValueError naming the key otherwise."""
    from jmoe.infer.load import open_model
    from jmoe.io.hf import DENSE_ARCHITECTURES
    from jmoe.train.rundir import config_diff

    base = open_model(plan.base, tokenizer=plan.gate_mode in ("hidden", "hidden_avg", "cheap_embed"))
    dense = "jmoe"
    if base.cfg.moe is not None or base.cfg.adapter is not None:
        raise ValueError(f"base_model {plan.base} is not a dense model (it has MoE layers or adapters)")
    if base.kind == "hf":
        dense = json.loads(dict(base.cfg.meta)["hf_config"]).get("model_type")
        if dense not in DENSE_ARCHITECTURES:
            raise ValueError(f"base_model {plan.base} is a {dense!r} model; dense bases: {', '.join(DENSE_ARCHITECTURES)}")
    fits = [a for a, ins in OUTPUTS.items() if dense in ins]
    arch = plan.architecture or ("jmoe" if plan.attention_experts else fits[0])
    if arch not in fits:
        raise ValueError(f"architecture {arch!r} is not built from a {dense} base; it takes {', '.join(OUTPUTS[arch])}")
    if plan.shared is not None and arch in ("mixtral", "qwen3_moe"):
        raise ValueError(f"architecture {arch} has no shared expert; remove shared_experts or build qwen2_moe from a "
                         "Qwen2 base")
    if arch == "qwen2_moe":
        if plan.shared is None:
            raise ValueError("qwen2_moe needs exactly one shared expert (shared_experts)")
        if not plan.shared.positive and plan.gate_mode not in ("random", "uniform_random"):
            raise ValueError("shared_experts[0] needs positive_prompts: they make the qwen2_moe shared-expert gate")
    sources = {plan.base.resolve(): base}
    named = [(f"experts[{i}]", e) for i, e in enumerate(plan.experts)]
    if plan.shared is not None:
        named.append(("shared_experts[0]", plan.shared))
    for where, e in named:
        key = e.source.resolve()
        if key not in sources:
            try:
                sources[key] = open_model(e.source, tokenizer=False)
            except ValueError as err:
                raise ValueError(f"{where}.source_model: {err}") from None
        cfg = sources[key].cfg
        if _comparable(cfg) != _comparable(base.cfg):
            raise ValueError(f"{where}.source_model {e.source} is not the base's model shape "
                             f"({config_diff(_comparable(base.cfg), _comparable(cfg))})")
    return {"base": base, "arch": arch, "sources": sources}


# ------------------------------------------------------------------ router rows


def layer_inputs(params: dict, tokens: jax.Array, cfg: LMConfig) -> jax.Array:
    """The residual stream entering every layer of a dense model: tokens [B, S] ->
    [L, B, S, d] float32 (layer 0's is the embedding)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = embed(params, tokens, cfg)
    out = []
    for i in range(cfg.n_layers):
        out.append(x.astype(jnp.float32))
        p = params["layers"][str(i)]
        x, h = attention_block(p, x, i, cfg, lambda _, pa, hh: causal_attention(pa, hh, positions, cfg))
        x = x + ffn(p["ffn"], h, cfg.activation).astype(x.dtype)
    return jnp.stack(out)


def _encode(tokenizer, prompts) -> list[list[int]]:
    bos = [] if getattr(tokenizer, "bos_id", None) is None else [tokenizer.bos_id]
    ids = [bos + tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    return [i if i else [0] for i in ids]


def _padded(ids: list[list[int]], limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [P, S] tokens and mask (causal attention keeps the real positions exact)."""
    width = max(len(i) for i in ids)
    if width > limit:
        raise ValueError(f"a prompt is {width} tokens long, beyond the model's context of {limit}")
    tokens, mask = np.zeros((len(ids), width), np.int32), np.zeros((len(ids), width), np.float32)
    for r, row in enumerate(ids):
        tokens[r, : len(row)], mask[r, : len(row)] = row, 1.0
    return tokens, mask


def prompt_hidden(params: dict, cfg: LMConfig, tokenizer, prompts, mode: str, batch: int = 16) -> np.ndarray:
    """[P, L, d] per prompt: the residual stream entering each layer at its last token
    ("hidden") or averaged over its tokens ("hidden_avg"), in batches of `batch` prompts."""
    apply = jax.jit(layer_inputs, static_argnums=2)
    ids = _encode(tokenizer, prompts)
    width = max(len(i) for i in ids)
    out = []
    for s in range(0, len(ids), batch):
        chunk = ids[s : s + batch]
        tokens, mask = _padded(chunk + [[0]] * (min(batch, len(ids)) - len(chunk)), cfg.max_seq_len)
        tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))  # one shape for every batch
        mask = np.pad(mask, ((0, 0), (0, width - mask.shape[1])))
        h = np.asarray(apply(params, jnp.asarray(tokens), cfg))[:, : len(chunk)]  # [L, p, S, d]
        m = mask[: len(chunk)]
        if mode == "hidden":
            v = h[:, np.arange(len(chunk)), m.sum(1).astype(int) - 1]
        else:
            v = (h * m[None, :, :, None]).sum(2) / m.sum(1)[None, :, None]
        out.append(np.moveaxis(v, 0, 1))
    return np.concatenate(out)


def _embed_vector(params, tokenizer, prompts) -> np.ndarray:
    w = np.asarray(params["embed"]["w"], np.float32)
    v = sum(w[row].sum(0) for row in _encode(tokenizer, prompts))
    return v / max(float(np.linalg.norm(v)), 1e-8)


def gate_vectors(params: dict, cfg: LMConfig, tokenizer, specs: list[ExpertSpec], mode: str, seed: int = 0,
                 log: Callable[[str], None] = lambda m: None) -> np.ndarray:
    """[L, N, d] router rows of the `specs` (mergekit's `get_gate_params`), from the dense
    base model `params`. Every prompt runs through the model once."""
    L, d, n = cfg.n_layers, cfg.d_model, len(specs)
    if mode == "random":
        return np.asarray(jax.random.normal(jax.random.key(seed), (L, n, d), jnp.float32))
    if mode == "uniform_random":
        bound = 1 / np.sqrt(d)
        return np.asarray(jax.random.uniform(jax.random.key(seed), (L, n, d), jnp.float32, -bound, bound))
    rows = np.zeros((L, n, d), np.float32)
    if mode == "cheap_embed":
        for j, spec in enumerate(specs):
            if spec.positive:
                v = _embed_vector(params, tokenizer, spec.positive)
                rows[:, j] = v - (_embed_vector(params, tokenizer, spec.negative) if spec.negative else 0)
    else:
        prompts = list(dict.fromkeys(p for s in specs for p in s.positive + s.negative))
        log(f"hidden states of the base model on {len(prompts)} prompt(s)")
        hidden = dict(zip(prompts, prompt_hidden(params, cfg, tokenizer, prompts, mode)))
        for j, spec in enumerate(specs):
            if spec.positive:
                v = np.mean([hidden[p] for p in spec.positive], axis=0)
                if spec.negative:
                    v = v - np.mean([hidden[p] for p in spec.negative], axis=0)
                rows[:, j] = v
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-8)


# ------------------------------------------------------------------ assembling


def _expert_ffn(params: dict, layer: int, spec: ExpertSpec, key) -> dict:
    out = {}
    for j, (name, w) in enumerate(sorted(params["layers"][str(layer)]["ffn"].items())):
        w = np.asarray(w, np.float32)
        if spec.noise_scale:
            w = w + spec.noise_scale * np.asarray(jax.random.normal(jax.random.fold_in(key, j), w.shape, jnp.float32))
        if name == "w_down":
            w = w * spec.residual_scale
        out[name] = w
    return out


def assemble(base_params: dict, base_cfg: LMConfig, moe_cfg: LMConfig, expert_params: list[dict],
             specs: list[ExpertSpec], rows: np.ndarray, shared: tuple[dict, ExpertSpec] | None,
             shared_row: np.ndarray | None, seed: int = 0, *, non_expert: str = "base") -> dict:
    """The MoE params: expert e of layer l the FFN of `expert_params[e]`, router columns
    `rows[l]` [E, d] (and the shared expert and its gate); with attention experts in
    `moe_cfg`, attention expert e of layer l the attention of `expert_params[e]` under the
    same router columns. The other weights are the base's (non_expert="base") or the mean of
    the experts' models' ("average")."""
    from jmoe.merge.experts.upcycle import average_trees
    from jmoe.nn import init_lm
    from jmoe.nn.attention_experts import experts_from_attentions

    key = jax.random.key(seed + 1)
    sources = [base_params] if non_expert == "base" else expert_params

    def rest(get):
        return average_trees([get(p) for p in sources])

    attention = moe_cfg.attention
    params = {k: rest(lambda p: p[k]) for k in base_params if k != "layers"}
    params["layers"] = {}
    for i in range(base_cfg.n_layers):
        own = ("ffn", "attn") if attention.experts else ("ffn",)
        layer = {k: rest(lambda p: p["layers"][str(i)][k]) for k in base_params["layers"][str(i)] if k not in own}
        if attention.experts:
            layer["attn"] = experts_from_attentions([p["layers"][str(i)]["attn"] for p in expert_params],
                                                    rows[i].T.copy(), shared_kv=attention.shared_kv)
        ffns = [_expert_ffn(p, i, s, jax.random.fold_in(key, i * 1000 + e))
                for e, (p, s) in enumerate(zip(expert_params, specs))]
        moe = {"router": {"w": rows[i].T.copy()}, "experts": {n: np.stack([f[n] for f in ffns]) for n in ffns[0]}}
        if shared is not None:
            moe["shared"] = _expert_ffn(shared[0], i, shared[1], jax.random.fold_in(key, 10**6 + i))
            if shared_row is not None:
                moe["shared_gate"] = {"w": shared_row[i][:, None].copy()}
        layer["moe"] = moe
        params["layers"][str(i)] = layer
    dtype = jnp.dtype(moe_cfg.param_dtype)
    params = jax.tree.map(lambda a: np.asarray(a).astype(dtype), params)
    expected = jax.eval_shape(lambda: init_lm(jax.random.key(0), moe_cfg))
    got_paths = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for p, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
        name = jax.tree_util.keystr(p)
        if got_paths.get(name) != tuple(leaf.shape):
            raise ValueError(f"the built model's {name} has shape {got_paths.get(name)}, its config needs {leaf.shape}")
    return params


def _moe_config(base_cfg: LMConfig, base_hf: dict | None, arch: str, num_experts: int, top_k: int, shared: bool,
                shared_gated: bool, dtype: str, attention_experts: str | None = None) -> tuple[LMConfig, dict | None]:
    """(the MoE model's LMConfig, its Hugging Face config.json or None for a jmoe run)."""
    from jmoe.io.hf import ARCHITECTURES
    from jmoe.merge.experts.upcycle import moe_config_from_dense

    if arch == "jmoe":
        moe = moe_config_from_dense(base_cfg, num_experts, top_k, num_shared_experts=int(shared),
                                    d_ff_shared=base_cfg.d_ff if shared else None, shared_gate=shared_gated)
        attention = base_cfg.attention
        if attention_experts:
            attention = dataclasses.replace(attention, experts=num_experts, shared_kv=attention_experts == "shared_kv")
        # meta=(): a dense Hugging Face base's config no longer describes the model
        return base_cfg.replace(moe=moe, moe_every=1, dense_layers=(), param_dtype=dtype, attention=attention,
                                meta=()), None
    hf = {k: v for k, v in base_hf.items() if k not in ("architectures", "auto_map")}
    ff = base_cfg.d_ff
    extra = {
        "mixtral": {"num_local_experts": num_experts, "intermediate_size": ff},
        "qwen2_moe": {"num_experts": num_experts, "moe_intermediate_size": ff, "intermediate_size": ff,
                      "shared_expert_intermediate_size": ff, "decoder_sparse_step": 1, "mlp_only_layers": [],
                      "norm_topk_prob": True, "use_sliding_window": False},
        "qwen3_moe": {"num_experts": num_experts, "moe_intermediate_size": ff, "intermediate_size": ff,
                      "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
    }[arch]
    hf.update(extra, num_experts_per_tok=top_k, model_type=arch, architectures=[ARCHITECTURES[arch]["class"]],
              torch_dtype=dtype)
    cfg = ARCHITECTURES[arch]["config"](hf).replace(param_dtype=dtype)
    return cfg, hf


def _routing_report(params, cfg, tokenizer, specs) -> dict:
    """Per layer, the share of each expert's positive prompts whose last token the built router
    sends first to that expert (how well the prompts separate the experts)."""
    from jmoe.nn import lm_apply

    owner = [e for e, spec in enumerate(specs) for _ in spec.positive]
    ids = _encode(tokenizer, [p for spec in specs for p in spec.positive])
    tokens, mask = _padded(ids, cfg.max_seq_len)
    routed = jax.jit(lambda p, t: [a.routing.expert_ids for a in lm_apply(p, t, cfg)[1].moe])(params, jnp.asarray(tokens))
    last = mask.sum(1).astype(int) - 1
    S = tokens.shape[1]
    top1 = [np.asarray(r)[:, 0].reshape(len(ids), S)[np.arange(len(ids)), last] for r in routed]  # per layer [P]
    return {"prompts": len(ids), "top1_own_expert": [round(float(np.mean(t == np.asarray(owner))), 4) for t in top1]}


def build_moe(config: str | Path | BuildPlan, out: str | Path, *, force: bool = False, seed: int = 0,
              allow_identical: bool = False, log: Callable[[str], None] = print) -> dict:
    """`jmoe moe-build CONFIG OUT`: check everything, read the models, build and write the MoE
    model (written aside and moved into place at the end). config: a YAML file or a
    `BuildPlan` (e.g. `upcycle_plan`). Returns the report, also written to
    OUT/moe_build_report.json."""
    from jmoe.merge.checkpoints import TOKENIZER_FILES
    from jmoe.merge.staging import check_output_dir, staged_dir

    plan = config if isinstance(config, BuildPlan) else parse_build_config(config, allow_identical=allow_identical)
    source = str(plan.base.absolute()) if isinstance(config, BuildPlan) else str(Path(config).absolute())
    out = check_output_dir(out, flag="OUT", force=force, force_flag="--force")
    models = check_models(plan)
    base, arch = models["base"], models["arch"]
    t0 = time.perf_counter()
    log(f"reading the base model {plan.base}")
    loaded = {}

    def params_of(path: Path) -> dict:
        key = path.resolve()
        if key not in loaded:
            m = models["sources"][key].load()
            loaded[key] = jax.tree.map(np.asarray, m.params)
        return loaded[key]

    base_params = params_of(plan.base)
    specs = list(plan.experts)
    gate_specs = specs + ([plan.shared] if plan.shared is not None and (plan.shared.positive or plan.gate_mode in (
        "random", "uniform_random")) else [])
    log(f"router rows: gate_mode {plan.gate_mode}")
    rows = gate_vectors(base_params, base.cfg, base.tokenizer, gate_specs, plan.gate_mode, seed=seed, log=log)
    shared_row = rows[:, len(specs)] if len(gate_specs) > len(specs) else None
    rows = rows[:, : len(specs)]
    conds = [float(np.linalg.cond(rows[i])) for i in range(base.cfg.n_layers)]
    bad = [i for i, c in enumerate(conds) if not np.isfinite(c) or c > 5]
    if bad and plan.gate_mode not in ("random", "uniform_random"):
        log(f"warning: the router rows of layer(s) {', '.join(map(str, bad))} are nearly dependent (condition number "
            f"> 5): their experts' prompts are alike, so routing will hardly tell them apart")
    dtype = plan.dtype or base.cfg.param_dtype
    base_hf = json.loads(dict(base.cfg.meta)["hf_config"]) if base.kind == "hf" else None
    cfg, hf_config = _moe_config(base.cfg, base_hf, arch, len(specs), plan.top_k, plan.shared is not None,
                                 shared_row is not None, dtype, plan.attention_experts)
    bam = f" and {len(specs)} attention experts ({plan.attention_experts})" if plan.attention_experts else ""
    log(f"assembling {len(specs)} experts per layer, top-{plan.top_k}{bam}, as {arch}")
    expert_params = [params_of(s.source) for s in specs]
    shared = (params_of(plan.shared.source), plan.shared) if plan.shared is not None else None
    params = assemble(base_params, base.cfg, cfg, expert_params, specs, rows, shared, shared_row, seed=seed,
                      non_expert=plan.non_expert)
    report = {"config": plan.raw, "architecture": arch, "gate_mode": plan.gate_mode, "num_experts": len(specs),
              "top_k": plan.top_k, "dtype": dtype, "attention_experts": plan.attention_experts,
              "non_expert_params": plan.non_expert, "router_condition_numbers": [round(c, 3) for c in conds]}
    if plan.gate_mode in ("hidden", "hidden_avg", "cheap_embed") and base.tokenizer is not None:
        report["prompt_routing"] = _routing_report(params, cfg, base.tokenizer, specs)
        log("prompts routed first to their own expert, per layer: "
            + " ".join(f"{x:.0%}" for x in report["prompt_routing"]["top1_own_expert"]))
    with staged_dir(out) as tmp:
        if hf_config is not None:
            from jmoe.io import hf

            hf.save(tmp, cfg, params, architecture=arch)
            for name in TOKENIZER_FILES + ("generation_config.json",):
                if (plan.base / name).is_file():
                    shutil.copy(plan.base / name, tmp / name)
        else:
            from jmoe.nn.transformer import init_lm_state
            from jmoe.train import TrainConfig, rundir

            if base.kind == "run":
                _, tc, data = rundir.read_config(plan.base)
                tc = tc.replace(base_from=None)
            else:  # a Hugging Face base: its tokenizer goes with the run
                tc, data = TrainConfig(seq_len=min(TrainConfig().seq_len, cfg.max_seq_len)), {}
                for name in TOKENIZER_FILES + ("generation_config.json",):
                    if (plan.base / name).is_file():
                        shutil.copy(plan.base / name, tmp / name)
            rundir.save_model_run(tmp, cfg, tc, params, init_lm_state(cfg), 0, data,
                                  meta={"built_from": source}, built_from=source)
        (tmp / "moe_build_config.yml").write_text(yaml.safe_dump(plan.raw, sort_keys=False))
        report["wall_s"] = time.perf_counter() - t0
        (tmp / "moe_build_report.json").write_text(json.dumps(report, indent=1))
    log(f"wrote {out} ({arch}, {cfg.num_params() / 1e6:.2f}M parameters, {cfg.num_params(active=True) / 1e6:.2f}M "
        "active)")
    return report


# ------------------------------------------------------------------ partitioning


def partition_run(model: str | Path, out: str | Path, *, num_experts: int, top_k: int = 2, force: bool = False,
                  step: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Union of Experts' MLP experts as a command: every dense FFN of the jmoe run `model`
    split into `num_experts` slices under a zero router (`jmoe.merge.experts.partition`),
    written as run `out`, which `jmoe train --resume-from out` fine-tunes. The report has the
    validation loss of the dense model and of the partitioned one (equal with top_k =
    num_experts; the sum of k slices otherwise, until the router trains). Everything is
    checked before the weights are read."""
    from jmoe.data import eval_batches, load_corpus
    from jmoe.merge.experts import partition
    from jmoe.merge.staging import check_output_dir, staged_dir
    from jmoe.train import rundir
    from jmoe.train.trainer import evaluate

    model = Path(model)
    if not rundir.is_run_dir(model):
        raise ValueError(f"--partition: {model} is not a jmoe run (it takes a dense jmoe run; a Hugging Face model "
                         "is upcycled with --upcycle)")
    cfg, _, _ = rundir.read_config(model)
    if cfg.moe is not None or cfg.adapter is not None:
        raise ValueError(f"--partition: {model} is not a dense model (it has MoE layers or adapters)")
    for name, v, hi in (("--partition", num_experts, cfg.d_ff), ("--top-k", top_k, num_experts)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            raise ValueError(f"{name} {v!r} must be an integer in [1, {hi}]")
    if cfg.d_ff % num_experts:
        raise ValueError(f"--partition {num_experts} must divide the model's FFN width d_ff={cfg.d_ff}")
    out = check_output_dir(out, flag="OUT", force=force, force_flag="--force")
    t0 = time.perf_counter()
    cfg, tc, params, router_state, saved, at = rundir.load_run(model, step)
    new_params, new_cfg = partition(params, cfg, num_experts=num_experts, top_k=top_k)
    val = eval_batches(load_corpus(tc.data).val, tc.eval_batches, tc.batch_size, tc.seq_len)
    before = evaluate(params, None, cfg, val)["val_loss"]
    after = evaluate(new_params, None, new_cfg, val)["val_loss"]
    report = {"source": str(model.absolute()), "step": at, "num_experts": num_experts, "top_k": top_k,
              "dense_val_loss": before, "val_loss": after,
              "active_params": new_cfg.num_params(active=True), "total_params": new_cfg.num_params()}
    with staged_dir(out) as tmp:
        rundir.save_model_run(tmp, new_cfg, tc, jax.tree.map(np.asarray, new_params), None, at, saved.get("data", {}),
                              meta={"partitioned_from": report["source"]})
        report["wall_s"] = time.perf_counter() - t0
        rundir.write_report(tmp, report)
    log(f"partitioned every FFN into {num_experts} experts, top-{top_k} ({report['active_params']:,} of "
        f"{report['total_params']:,} parameters active); validation loss {before:.4f} dense, {after:.4f} partitioned; "
        f"wrote {out} (fine-tune it with jmoe train --resume-from {out})")
    return report
