"""The decoder-only MoE transformer language model.

Pre-norm blocks: x += attn(rms_norm(x)); x += ffn_or_moe(rms_norm(x)). Causal attention with
RoPE and grouped-query heads; the FFN of layer i is an MoE layer (`jmoe.moe_layer`) when
`cfg.is_moe_layer(i)` and a dense FFN otherwise.

Parameters are a plain pytree:
  {"embed": {"w": [V, d]},
   "layers": {"0": {"attn_norm", "attn", "ffn_norm", "moe" | "ffn"}, "1": ..., ...},
   "final_norm": {"scale": [d]},
   "unembed": {"w": [d, V]},            # absent when cfg.tie_embeddings
   "adapters": {"0": {...}, ...},       # only with cfg.adapter (see jmoe.adapters)
   "task_head": {...}}                  # only with cfg.task_head (see jmoe.nn.task_head)
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jmoe import adapters as adapters_lib
from jmoe.adapters import AdapterAux, AdapterConfig
from jmoe.checks import is_int
from jmoe.config import MoEConfig, canonical_dtype
from jmoe.options import check_fields, option, reject_unknown_fields
from jmoe.experts import ffn, init_ffn
from jmoe.layer import MoEAux, init_moe, init_moe_state, moe_layer
from jmoe.registry import ROUTERS
from jmoe.nn.attention import AttentionConfig, causal_attention, init_attention, init_rms_norm, rms_norm
from jmoe.nn.module import ParamModule
from jmoe.nn.task_head import TaskHeadConfig, init_task_head, task_head_delta


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """A decoder-only transformer.

    vocab_size: V (256 for byte-level text).
    d_model, n_layers, n_heads: width, depth, query heads.
    n_kv_heads: key/value heads (grouped-query attention); default n_heads.
    d_head: per-head width; default d_model // n_heads.
    d_ff: hidden width of dense FFN layers.
    activation: activation of dense FFN layers.
    moe: the MoE layer config, or None for a dense model. Its d_model must equal d_model.
    moe_every: layer i is an MoE layer when (i + 1) % moe_every == 0 (1: every layer) and i
      is not in dense_layers.
    dense_layers: layers that keep a dense FFN (e.g. DeepSeek's first layers).
    layer_moe: (layer, MoEConfig) pairs for MoE layers that differ from `moe` (e.g. a
      different number of experts after compression).
    max_seq_len: longest sequence the model is trained or sampled with.
    attention: the attention variant (GQA with optional biases and q/k norms, or MLA) and its
      RoPE settings.
    rope_theta, norm_eps, tie_embeddings, dtype (compute; None = float32), param_dtype.
    meta: free-form (key, value) pairs carried with the config (e.g. the Hugging Face
      architecture and config a model was converted from).
    adapter: trainable adapters on the model (`jmoe.adapters.AdapterConfig`), or None.
    task_head: a multi-task head on the last hidden state (`jmoe.nn.task_head.TaskHeadConfig`),
      or None; it adds the output of its chosen task (none: off) before the final norm.
    """

    vocab_size: int = option(256, ge=1)
    d_model: int = option(128, ge=1)
    n_layers: int = option(4, ge=1)
    n_heads: int = option(4, ge=1)
    n_kv_heads: int | None = option(None, ge=1)
    d_head: int | None = option(None, ge=1)
    d_ff: int = option(512, ge=1)
    activation: str = "swiglu"
    moe: MoEConfig | None = None
    moe_every: int = option(1, ge=1)
    max_seq_len: int = option(256, ge=1)
    rope_theta: float = option(10000.0, gt=0.0)
    norm_eps: float = option(1e-6, gt=0.0)
    tie_embeddings: bool = False
    dtype: Any = None
    param_dtype: Any = "float32"
    attention: AttentionConfig = AttentionConfig()
    dense_layers: tuple = ()
    layer_moe: tuple = ()
    meta: tuple = ()
    adapter: AdapterConfig | None = None
    task_head: TaskHeadConfig | None = None

    def __post_init__(self):
        if isinstance(self.task_head, dict):
            object.__setattr__(self, "task_head", TaskHeadConfig.from_dict(self.task_head))
        if self.task_head is not None:
            if not isinstance(self.task_head, TaskHeadConfig):
                raise ValueError("LMConfig.task_head must be a TaskHeadConfig, a mapping or None, got "
                                 f"{type(self.task_head).__name__}")
            home = self.task_head.home
            if home.d_in != self.d_model or home.d_out != self.d_model:
                raise ValueError(f"LMConfig.task_head reads and writes d_in={home.d_in}, d_out={home.d_out}; both "
                                 f"must equal d_model={self.d_model}")
        if isinstance(self.adapter, dict):
            object.__setattr__(self, "adapter", AdapterConfig.from_dict(self.adapter))
        if self.adapter is not None and not isinstance(self.adapter, AdapterConfig):
            raise ValueError(f"LMConfig.adapter must be an AdapterConfig, a mapping or None, got {type(self.adapter).__name__}")
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
        if isinstance(self.attention, dict):
            object.__setattr__(self, "attention", AttentionConfig(**self.attention))
        if isinstance(self.meta, dict):
            object.__setattr__(self, "meta", tuple(sorted(self.meta.items())))
        if isinstance(self.layer_moe, dict):
            object.__setattr__(self, "layer_moe", tuple(self.layer_moe.items()))
        if isinstance(self.moe, MoEConfig) or self.moe is None:
            check_fields(self, "LMConfig")
        else:
            raise ValueError(f"LMConfig.moe must be a MoEConfig, a mapping or None, got {type(self.moe).__name__}")
        if self.d_head is None and self.d_model % self.n_heads:
            raise ValueError(f"LMConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set d_head")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"LMConfig.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}")
        if self.attention.head_top_k > self.n_heads:
            raise ValueError(f"LMConfig.attention.head_top_k={self.attention.head_top_k} exceeds n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LMConfig.d_head={self.head_dim} must be even (rotary embeddings)")
        for i in self.dense_layers:
            if not is_int(i) or not 0 <= i < self.n_layers:
                raise ValueError(f"LMConfig.dense_layers entry {i!r} must be a layer index in [0, n_layers={self.n_layers})")
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))
        overrides = []
        for layer, moe in self.layer_moe:
            moe = MoEConfig.from_dict(moe) if isinstance(moe, dict) else moe
            if moe.d_model != self.d_model:
                raise ValueError(f"LMConfig.layer_moe[{layer}].d_model={moe.d_model} must equal d_model={self.d_model}")
            overrides.append((int(layer), moe))
        object.__setattr__(self, "layer_moe", tuple(sorted(overrides, key=lambda kv: kv[0])))
        if isinstance(self.meta, dict):
            object.__setattr__(self, "meta", tuple(sorted(self.meta.items())))
        else:
            object.__setattr__(self, "meta", tuple(tuple(kv) for kv in self.meta))
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise ValueError(f"LMConfig.moe must be a MoEConfig or None, got {type(self.moe).__name__}")
            if self.moe.d_model != self.d_model:
                raise ValueError(f"LMConfig.moe.d_model={self.moe.d_model} must equal d_model={self.d_model}")
            if not ROUTERS.get(self.moe.router).causal and not self.moe.allow_noncausal:
                raise ValueError(
                    f"router {self.moe.router!r} is not causal: a token's experts depend on later tokens, which "
                    "leaks the future in a decoder; set moe.allow_noncausal=True to use it anyway"
                )
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype, "LMConfig.dtype"))
        object.__setattr__(self, "param_dtype", canonical_dtype(self.param_dtype, "LMConfig.param_dtype"))
        from jmoe.registry import ACTIVATIONS

        if self.activation not in ACTIVATIONS:
            raise ValueError(f"LMConfig.activation={self.activation!r} is unknown; known: {', '.join(ACTIVATIONS.names())}")
        if self.adapter is not None:
            adapters_lib.check_adapter(self)

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when unset."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        """Per-head width: d_head, or d_model // n_heads when unset."""
        return self.d_head or self.d_model // self.n_heads

    def moe_for(self, i: int) -> MoEConfig:
        """The MoE config of layer i (its override, or `moe`)."""
        for layer, moe in self.layer_moe:
            if layer == i:
                return moe
        return self.moe

    def with_moe(self, **changes) -> "LMConfig":
        """A copy with `changes` applied to the MoE config of every MoE layer (`moe` and the
        per-layer overrides), e.g. `cfg.with_moe(skip_ratio=0.3)`."""
        if self.moe is None:
            raise ValueError("this model has no MoE layers")
        return self.replace(moe=self.moe.replace(**changes),
                            layer_moe=tuple((i, m.replace(**changes)) for i, m in self.layer_moe))

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and (i + 1) % self.moe_every == 0 and i not in self.dense_layers

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    def replace(self, **changes) -> "LMConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"LMConfig has no field(s) {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["moe"] = None if self.moe is None else self.moe.to_dict()
        d["attention"] = self.attention.to_dict()
        d["dense_layers"] = list(self.dense_layers)
        if self.layer_moe:  # written only when set, so older configs read the same
            d["layer_moe"] = {str(i): m.to_dict() for i, m in self.layer_moe}
        else:
            del d["layer_moe"]
        if self.adapter is not None:  # likewise
            d["adapter"] = self.adapter.to_dict()
        else:
            del d["adapter"]
        if self.task_head is not None:  # likewise
            d["task_head"] = self.task_head.to_dict()
        else:
            del d["task_head"]
        d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        reject_unknown_fields(cls, d, "LMConfig")
        d = dict(d)
        if d.get("moe") is not None:
            d["moe"] = MoEConfig.from_dict(d["moe"])
        return cls(**d)

    def num_params(self, active: bool = False) -> int:
        """Parameter count (active=True: per token, counting k routed experts and the shared ones,
        and with selective heads the query and output projections of k heads)."""
        shapes = jax.eval_shape(lambda: init_lm(jax.random.key(0), self))
        total = 0
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
            n = 1
            for s in leaf.shape:
                n *= s
            keys = [getattr(p, "key", None) for p in path]
            if active and "experts" in keys and self.moe is not None:
                moe = self.moe_for(int(keys[1])) if keys[0] == "layers" else self.moe
                n = n // moe.num_experts * min(moe.top_k, moe.num_experts)
            if active and self.attention.head_top_k and "attn" in keys and keys[-1] in ("wq", "wo", "bq"):
                n = n // self.n_heads * self.attention.head_top_k
            total += n
        return total


def init_lm(key: jax.Array, cfg: LMConfig) -> dict:
    """Parameters of the language model (see the module docstring for the tree)."""
    return _init_lm(key, cfg)


@partial(jax.jit, static_argnums=1)
def _init_lm(key, cfg):
    dt = cfg.param_dtype
    k_embed, k_unembed, k_layers = jax.random.split(key, 3)
    params: dict[str, Any] = {
        "embed": {
            "w": (cfg.d_model**-0.5 * jax.random.truncated_normal(k_embed, -2, 2, (cfg.vocab_size, cfg.d_model))).astype(dt)
        },
        "layers": {},
        "final_norm": init_rms_norm(cfg.d_model, dt),
    }
    for i, k_layer in enumerate(jax.random.split(k_layers, cfg.n_layers)):
        k_attn, k_ffn = jax.random.split(k_layer)
        layer = {
            "attn_norm": init_rms_norm(cfg.d_model, dt),
            "attn": init_attention(k_attn, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, dt, cfg.attention),
            "ffn_norm": init_rms_norm(cfg.d_model, dt),
        }
        if cfg.is_moe_layer(i):
            layer["moe"] = init_moe(k_ffn, cfg.moe_for(i).replace(param_dtype=dt))
        else:
            layer["ffn"] = init_ffn(k_ffn, cfg.d_model, cfg.d_ff, cfg.activation, dt)
        params["layers"][str(i)] = layer
    if not cfg.tie_embeddings:
        params["unembed"] = {
            "w": (cfg.d_model**-0.5 * jax.random.truncated_normal(k_unembed, -2, 2, (cfg.d_model, cfg.vocab_size))).astype(dt)
        }
    if cfg.adapter is not None:  # from their own key: the frozen parameters do not depend on the adapter
        params["adapters"] = adapters_lib.init_adapters(jax.random.fold_in(key, 0xADA), cfg)
    if cfg.task_head is not None:  # likewise
        params["task_head"] = init_task_head(jax.random.fold_in(key, 0x4EAD), cfg.task_head)
    return params


def init_lm_state(cfg: LMConfig) -> dict:
    """Explicit router state per MoE layer, and of adapters that keep one under
    "adapter/<layer>" ({} when nothing has state)."""
    adapter_state = adapters_lib.init_adapter_state(cfg)
    if cfg.moe is None:
        return adapter_state
    states = {str(i): init_moe_state(cfg.moe_for(i)) for i in cfg.moe_layers}  # a fresh state per layer
    return {**{k: v for k, v in states.items() if v is not None}, **adapter_state}


def lm_state_from_params(cfg: LMConfig, params: dict) -> dict:
    """The router state of a model whose parameters carry it: a converted checkpoint's
    selection bias (DeepSeek-V3's `e_score_correction_bias`, kept as `router/bias`) starts the
    aux-loss-free bias; other state starts fresh (`init_lm_state`)."""
    state = init_lm_state(cfg)
    for layer, s in state.items():
        if layer.startswith("adapter/"):
            continue
        bias = params["layers"][layer]["moe"]["router"].get("bias")
        if bias is not None and isinstance(s, dict) and "bias" in s:
            state[layer] = {**s, "bias": jnp.asarray(bias, s["bias"].dtype)}
    return state


def stack_padded(rows: list[jax.Array]) -> jax.Array:
    """[len(rows), max C] from 1-D arrays of possibly different lengths, zero-padded."""
    width = max(r.shape[0] for r in rows)
    return jnp.stack([jnp.pad(r, (0, width - r.shape[0])) for r in rows])


@struct.dataclass
class LMAux:
    """moe_loss: the auxiliary losses to add to the training loss: the sum of the MoE layers'
    weighted aux losses plus the adapters' (`jmoe.adapters.mean_adapter_loss`); moe: MoEAux
    per MoE layer (in order); moe_inputs: the MoE layers' inputs [B, S, d] (normed residual),
    with `lm_apply(..., keep_moe_inputs=True)` only; adapters: {layer: AdapterAux} of the
    layers whose FFN runs an adapter."""

    moe_loss: jax.Array
    moe: tuple[MoEAux, ...]
    moe_inputs: tuple = ()
    adapters: dict = struct.field(default_factory=dict)

    def load(self) -> jax.Array:
        """[L_moe, C] per-layer load over the router's choices (zero-padded to the widest layer
        when merged or pruned layers differ; `MoEConfig.num_choices` gives each layer's C)."""
        return stack_padded([a.load for a in self.moe]) if self.moe else jnp.zeros((0, 0))

    def counts(self, cfg: LMConfig) -> dict:
        """{layer: [C] selected-slot counts} of this call, and {"adapter/<layer>": {router:
        counts}} of the adapters (sum them over micro-batches)."""
        counts = {str(i): a.tokens_per_expert for i, a in zip(cfg.moe_layers, self.moe)}
        counts.update({f"adapter/{i}": a.counts for i, a in self.adapters.items()})
        return counts


def update_lm_state(state: dict, counts: dict, cfg: LMConfig) -> dict:
    """The routers' once-per-step state update from the step's per-layer counts."""
    if not state:
        return state
    out = {}
    for layer, s in state.items():
        if layer.startswith("adapter/"):
            out[layer] = adapters_lib.update_adapter_state(s, counts[layer], cfg)
            continue
        if layer.startswith("placement/"):  # expert placement: changed only by re-placing
            out[layer] = s
            continue
        if layer.startswith("placement_load/"):  # loads since the last re-placement
            idx = layer.split("/", 1)[1]
            out[layer] = s + counts[idx][: s.shape[0]].astype(s.dtype)
            continue
        moe = cfg.moe_for(int(layer))
        update = ROUTERS.get(moe.router).update_state
        out[layer] = s if update is None else update(s, counts[layer], moe)
    return out


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token next-token NLL [B, S] (nats, float32) of logits [B, S, V] against targets [B, S]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def lm_apply(
    params: dict,
    tokens: jax.Array,
    cfg: LMConfig,
    *,
    state: dict | None = None,
    key: jax.Array | None = None,
    positions: jax.Array | None = None,
    ep: Any = None,
    balance_counts: dict | None = None,
    keep_moe_inputs: bool = False,
) -> tuple[jax.Array, LMAux]:
    """Logits of the next token.

    Args:
      params: from `init_lm`.
      tokens: [B, S] int token ids.
      state: router state per MoE layer (from `init_lm_state`), if any; "placement/<layer>"
        entries place that layer's experts on `ep`'s mesh (`jmoe.train.rebalance`).
      key: PRNG key for stochastic routing (training); None is deterministic.
      positions: [B, S] positions (default 0..S-1).
      ep: a `jmoe.parallel.ExpertParallel`: run the MoE layers expert-parallel on its mesh.
      balance_counts: {layer: [C] counts of the whole optimizer step} for global-scope
        balance losses under gradient accumulation (see `LMAux.counts`).
    Returns:
      logits [B, S, V] float32, and `LMAux`.
    """
    x, aux = lm_hidden(params, tokens, cfg, state=state, key=key, positions=positions, ep=ep,
                       balance_counts=balance_counts, keep_moe_inputs=keep_moe_inputs)
    return unembed(params, x, cfg), aux


def lm_hidden(params: dict, tokens: jax.Array, cfg: LMConfig, *, state: dict | None = None,
              key: jax.Array | None = None, positions: jax.Array | None = None, ep: Any = None,
              balance_counts: dict | None = None, keep_moe_inputs: bool = False) -> tuple[jax.Array, LMAux]:
    """`lm_apply` without its last step: the last hidden state x [B, S, d] (before the final
    norm; `unembed` makes the logits of it) and `LMAux`."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array [batch, seq], got {tokens.dtype}{tuple(tokens.shape)}")
    B, S = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    x = embed(params, tokens, cfg)
    x, auxes, inputs, adapter_auxes = decoder_layers(
        params, x, cfg, attend=lambda i, p, h: causal_attention(p, h, positions, cfg), state=state, key=key, ep=ep,
        balance_counts=balance_counts, keep_moe_inputs=keep_moe_inputs,
    )
    moe_loss = sum((a.loss for a in auxes), jnp.zeros((), jnp.float32))
    moe_loss = moe_loss + adapters_lib.mean_adapter_loss(list(adapter_auxes.values()))
    return x, LMAux(moe_loss=moe_loss, moe=tuple(auxes), moe_inputs=tuple(inputs), adapters=adapter_auxes)


def embed(params: dict, tokens: jax.Array, cfg: LMConfig) -> jax.Array:
    """tokens [B, S] int -> [B, S, d] embeddings in the compute dtype."""
    return jnp.take(params["embed"]["w"], tokens, axis=0).astype(jnp.dtype(cfg.dtype or "float32"))


def unembed(params: dict, x: jax.Array, cfg: LMConfig) -> jax.Array:
    """The final norm and the output projection: x [..., d] -> logits [..., V] float32 (with a
    task head running as a task, x plus its output)."""
    if cfg.task_head is not None and cfg.task_head.task is not None:
        h = rms_norm(params["final_norm"], x, cfg.norm_eps)
        x = x + task_head_delta(params["task_head"], h, cfg.task_head).astype(x.dtype)
    x = rms_norm(params["final_norm"], x, cfg.norm_eps)
    w_out = params["embed"]["w"].T if cfg.tie_embeddings else params["unembed"]["w"]
    return jnp.einsum("...d,dv->...v", x.astype(jnp.float32), w_out.astype(jnp.float32))


Attend = Callable[[int, dict, jax.Array], jax.Array]
"""`(layer index, the layer's attention params, normed input [B, S, d]) -> [B, S, d]`."""


def attention_block(p: dict, x: jax.Array, i: int, cfg: LMConfig, attend: Attend) -> tuple[jax.Array, jax.Array]:
    """The first half of block i: x + attend(rms_norm(x)) -> (x [B, S, d], its FFN input
    rms_norm(x)). `p` is the layer's parameters."""
    h = rms_norm(p["attn_norm"], x, cfg.norm_eps)
    x = x + attend(i, p["attn"], h).astype(x.dtype)
    return x, rms_norm(p["ffn_norm"], x, cfg.norm_eps)


def decoder_layers(
    params: dict,
    x: jax.Array,
    cfg: LMConfig,
    *,
    attend: Attend,
    moe_config: Callable[[int], MoEConfig] | None = None,
    state: dict | None = None,
    key: jax.Array | None = None,
    ep: Any = None,
    balance_counts: dict | None = None,
    keep_moe_inputs: bool = False,
) -> tuple[jax.Array, list[MoEAux], list[jax.Array], dict[str, AdapterAux]]:
    """The pre-norm blocks: x += attend(rms_norm(x)); x += ffn_or_moe(rms_norm(x)).

    The one layer loop of the model: `lm_apply` attends over the whole sequence, the inference
    engine (`jmoe.infer`) over its KV cache.

    Args:
      x: [B, S, d] embeddings in the compute dtype.
      attend: the attention of layer i (see `Attend`).
      moe_config: the MoE config layer i runs with (default `cfg.moe_for(i)`; the inference
        engine changes the dispatch per step shape).
      state: router state per MoE layer, as in `lm_apply`.
      key: PRNG key for stochastic routing, as in `lm_apply`.
      ep: a `jmoe.parallel.ExpertParallel`, as in `lm_apply`.
      balance_counts: whole-step counts per MoE layer, as in `lm_apply`.
      keep_moe_inputs: also return the MoE layers' inputs.
    Returns:
      x [B, S, d] before the final norm, the MoE layers' `MoEAux` in order, (with
      keep_moe_inputs) their inputs, and {layer: AdapterAux} of the FFN adapters.

    With `cfg.adapter`, `params["adapters"]` adapts the layers (`jmoe.adapters`): attention
    and routed-expert weights take their LoRA, dense FFNs run the adapter's FFN.
    """
    dt = x.dtype
    state = state or {}
    balance_counts = balance_counts or {}
    moe_config = moe_config or cfg.moe_for
    carry = None
    auxes, inputs, adapter_auxes = [], [], {}
    layer_keys = jax.random.split(key, cfg.n_layers) if key is not None else [None] * cfg.n_layers
    adapters = params.get("adapters", {}) if cfg.adapter is not None else {}
    if adapters:
        adapters_lib.check_adapter_params(adapters, cfg)
    for i in range(cfg.n_layers):
        p = params["layers"][str(i)]
        ad = adapters.get(str(i), {})
        if "attn" in ad:
            p = {**p, "attn": adapters_lib.adapted_attention(p["attn"], ad["attn"], cfg.adapter)}
        if "experts" in ad:
            p = {**p, "moe": {**p["moe"], "experts": adapters_lib.adapted_experts(p["moe"]["experts"], ad["experts"],
                                                                                  cfg.adapter)}}
        with jax.named_scope(f"layer_{i}"):
            x, h = attention_block(p, x, i, cfg, attend)
            if "ffn" in ad:
                k = None if layer_keys[i] is None else jax.random.fold_in(layer_keys[i], 1)
                y, adapter_auxes[str(i)] = adapters_lib.adapted_ffn_layer(p["ffn"], ad["ffn"], h, cfg,
                                                                          state=state.get(f"adapter/{i}"), key=k)
            elif cfg.is_moe_layer(i):
                y, aux = moe_layer(
                    p["moe"], h, moe_config(i), state=state.get(str(i)), key=layer_keys[i], ep=ep, carry=carry,
                    balance_counts=balance_counts.get(str(i)), slots=state.get(f"placement/{i}"),
                )
                carry = aux.routing.carry
                auxes.append(aux)
                if keep_moe_inputs:
                    inputs.append(h)
            else:
                y = ffn(p["ffn"], h, cfg.activation)
            x = x + y.astype(dt)
    return x, auxes, inputs, adapter_auxes


class TransformerLM(ParamModule):
    """NNX module over `init_lm`/`lm_apply`; `nnx.split` gives the `init_lm` tree.

    Call: `logits, aux = model(tokens, key=None)` with tokens `[B, S]`.
    """

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs | None = None, params: dict | None = None):
        if (rngs is None) == (params is None):
            raise ValueError("TransformerLM needs exactly one of rngs (new parameters) or params (existing ones)")
        self.cfg = cfg
        self.set_params(params if params is not None else init_lm(rngs.params(), cfg))
        self.set_state(init_lm_state(cfg) if params is None else lm_state_from_params(cfg, params))

    @classmethod
    def from_params(cls, cfg: LMConfig, params: dict) -> "TransformerLM":
        """A module around an existing parameter tree (e.g. a converted checkpoint)."""
        return cls(cfg, params=params)

    def __call__(self, tokens: jax.Array, *, key: jax.Array | None = None) -> tuple[jax.Array, LMAux]:
        return lm_apply(self.params(), tokens, self.cfg, state=self.state(), key=key)
