"""The language model over a KV cache: prefill a batch of prompts, then one token per row.

Both run the model's own layer loop (`jmoe.nn.transformer.decoder_layers`) with cached
attention. Inference never drops tokens: each step's MoE layers run dropless. With stacked
expert weights, a step with few tokens gathers only the selected experts' weights
(`jmoe.dispatch.gather`), picked per step shape by `decode_dispatch`; with experts in the
`ExpertList` serving layout (`serving_params`, what the engine uses on CPU) every step runs
the dropless loop, which picks each expert's own arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.adapters import fold_weight_lora
from jmoe.config import MoEConfig
from jmoe.dispatch.gather import decode_dispatch
from jmoe.experts import ExpertList, mixed_widths, stacked_experts
from jmoe.infer.attention import cached_attention, prefill_attention
from jmoe.infer.cache import KVCache, init_cache, write
from jmoe.layer import ffn_routing
from jmoe.nn.transformer import LMConfig, decoder_layers, embed, unembed
from jmoe.registry import DISPATCHERS, ROUTERS

SERVED_DISPATCHES = ("dropless", "gather")


def check_servable(cfg: LMConfig) -> None:
    """ValueError when a model cannot be decoded token by token (a router whose choice for a
    token depends on the other tokens of the sequence)."""
    if cfg.attention.head_top_k and cfg.attention.head_selection == "expert":
        raise ValueError("attention.head_selection 'expert' picks tokens per head over the whole sequence, so it cannot "
                         "decode one token at a time; generate from a model whose tokens select their heads")
    for i in cfg.moe_layers:
        moe = cfg.moe_for(i)
        if not ROUTERS.get(moe.router).causal:
            raise ValueError(
                f"router {moe.router!r} (layer {i}) picks tokens per expert over the whole sequence, so it cannot "
                "decode one token at a time; generate from a model with a token-choice router"
            )


MIN_BLOCK = 32


def serving_block_size(num_tokens: int, top_k: int, num_experts: int, block_size: int) -> int:
    """Rows per chunk of a dropless step: twice the mean slots per expert rounded up to a power
    of two, at least `MIN_BLOCK`, at most the configured `block_size`."""
    per_expert = -(-num_tokens * top_k // num_experts)
    return min(block_size, max(MIN_BLOCK, 1 << (2 * per_expert - 1).bit_length()))


EXPERT_LAYOUTS = ("auto", "stacked", "split")


def serving_params(params: dict, cfg: LMConfig, layout: str = "auto") -> dict:
    """params with every MoE layer's routed experts in the serving layout, and the adapters
    that are fixed weight deltas folded into their weights (`jmoe.adapters.fold_weight_lora`).

    layout: "split" puts them in an `ExpertList` (E separate arrays per layer, a copy made
    once); "stacked" keeps them as they are (or stacks an `ExpertList`, except one of mixed
    bit widths, which stacking would dequantize: the GPU's grouped matmul runs it width by
    width); "auto" splits on the CPU, where XLA copies a stacked expert's slice before each of
    its matmuls, and keeps them stacked elsewhere (the grouped matmuls of GPU and TPU take the
    stack).
    """
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout={layout!r} is unknown; known: {', '.join(EXPERT_LAYOUTS)}")
    params = fold_weight_lora(params, cfg)  # weight-delta adapters once, not at every step
    if layout == "auto":
        layout = "split" if jax.default_backend() == "cpu" else "stacked"
    def convert(experts):
        if layout == "split":
            return ExpertList.split(experts)
        return experts if mixed_widths(experts) else stacked_experts(experts)

    layers = dict(params["layers"])
    for i in cfg.moe_layers:
        layer = dict(layers[str(i)])
        if "experts" not in layer["moe"]:  # held elsewhere (offloaded)
            continue
        layer["moe"] = {**layer["moe"], "experts": convert(layer["moe"]["experts"])}
        layers[str(i)] = layer
    return {**params, "layers": layers}


def serving_moe(moe: MoEConfig, num_tokens: int, split: bool = False) -> MoEConfig:
    """The MoE config a step of `num_tokens` tokens runs with.

    With stacked experts the dispatch is picked by `decode_dispatch` (the model's own options
    kept when it already uses it); with `split` experts (an `ExpertList`) it is dropless. A
    dropless step with few slots per expert runs in chunks of at most twice its mean slots
    per expert (at least `MIN_BLOCK` rows): a decoding step of 8 tokens with k=2 over 8
    experts has 2 slots per expert, which the training block of 512 rows would pad to 32-row
    chunks (measured in experiments/bench_decode_dispatch.py).
    """
    if getattr(DISPATCHERS.get(moe.dispatch), "keep_when_serving", False):  # compressed experts
        block = serving_block_size(num_tokens, moe.top_k, moe.num_experts, moe.dispatch_options.block_size)
        return moe if block == moe.dispatch_options.block_size else moe.with_options(moe.dispatch, block_size=block)
    name = "dropless" if split else decode_dispatch(num_tokens, moe.top_k, moe.num_experts)
    if name != "dropless":
        return moe if moe.dispatch == name else moe.replace(dispatch=name)
    if moe.dispatch != "dropless":
        moe = moe.replace(dispatch="dropless")
    block = serving_block_size(num_tokens, moe.top_k, moe.num_experts, moe.dispatch_options.block_size)
    if block != moe.dispatch_options.block_size:
        moe = moe.with_options("dropless", block_size=block)
    return moe


def _moe_config(cfg: LMConfig, num_tokens: int, params: dict):
    def moe_for(i):
        split = isinstance(params["layers"][str(i)]["moe"].get("experts"), ExpertList)
        return serving_moe(cfg.moe_for(i), num_tokens, split)

    return moe_for


def prefill(params: dict, state: dict | None, tokens: jax.Array, lengths: jax.Array, cfg: LMConfig,
            max_len: int, *, with_routing: bool = False) -> tuple:
    """Run right-padded prompts and fill a fresh cache.

    Args:
      tokens: [B, P] prompt ids, row b valid up to lengths[b] (the rest is padding).
      lengths: [B] int32 prompt lengths, 1 .. P.
      max_len: cache positions (>= P).
      with_routing: also return the step's `step_routing` ([B, P, k] per MoE layer).
    Returns:
      logits [B, V] float32 of each row's last prompt token, and the cache (lengths set);
      with_routing, the routing as a third element.
    """
    B, P = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    cache = init_cache(cfg, B, max_len)
    entries = []

    def attend(i, p, h):
        out, entry = prefill_attention(p, h, positions, cfg)
        entries.append({name: write(cache.layers[i][name], value, positions) for name, value in entry.items()})
        return out

    x, auxes, inputs, _ = decoder_layers(params, embed(params, tokens, cfg), cfg, attend=attend, state=state,
                                      moe_config=_moe_config(cfg, B * P, params), keep_moe_inputs=with_routing)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
    out = unembed(params, last, cfg), KVCache(layers=tuple(entries), lengths=lengths.astype(jnp.int32))
    return (*out, step_routing(params, state, cfg, auxes, inputs, (B, P))) if with_routing else out


def extend(params: dict, state: dict | None, tokens: jax.Array, cache: KVCache, cfg: LMConfig, *,
           with_routing: bool = False) -> tuple:
    """Append tokens [B, n] at each row's next positions -> (logits [B, n, V] float32, cache),
    and with `with_routing` the step's `step_routing` ([B, n, k] per MoE layer).

    Positions past the cache's end are clamped to its last slot (rows that have finished keep
    stepping with the others; what they write is never read).
    """
    B, n = tokens.shape
    positions = jnp.minimum(cache.lengths[:, None] + jnp.arange(n, dtype=jnp.int32), cache.max_len - 1)
    entries = []

    def attend(i, p, h):
        out, entry = cached_attention(p, h, positions, cache.layers[i], cfg)
        entries.append(entry)
        return out

    x, auxes, inputs, _ = decoder_layers(params, embed(params, tokens, cfg), cfg, attend=attend, state=state,
                                      moe_config=_moe_config(cfg, B * n, params), keep_moe_inputs=with_routing)
    out = unembed(params, x, cfg), KVCache(layers=tuple(entries), lengths=cache.lengths + n)
    return (*out, step_routing(params, state, cfg, auxes, inputs, (B, n))) if with_routing else out


def step_routing(params: dict, state: dict | None, cfg: LMConfig, auxes, inputs, shape: tuple[int, int]) -> dict:
    """What a step's MoE layers chose, per MoE layer (tuples in layer order), tokens [B, n]:

      expert_ids  [B, n, k] int32 physical expert of each slot, -1 where unused (masked
                  slots, FLOP-free experts)
      weights     [B, n, k] float32 combine weights, 0 where unused
      gate_ids    [B, n, k] int32 the cross-layer gate's guess of this layer's experts: its
                  router applied to the previous MoE layer's input and routing carry (what a
                  prefetcher knows one layer ahead); -1 at the first MoE layer

    `auxes` and `inputs` are `decoder_layers`' MoE outputs (with keep_moe_inputs).
    """
    state = state or {}
    ids, weights, gates = [], [], []
    layers = cfg.moe_layers
    for j, (i, aux) in enumerate(zip(layers, auxes)):
        moe = cfg.moe_for(i)
        r = ffn_routing(aux.routing, moe)
        keep = r.mask & (r.expert_ids >= 0) & (r.expert_ids < moe.num_experts)
        ids.append(jnp.where(keep, r.expert_ids, -1).astype(jnp.int32).reshape(*shape, -1))
        weights.append(jnp.where(keep, r.weights, 0.0).astype(jnp.float32).reshape(*shape, -1))
        if j == 0:
            gates.append(jnp.full(ids[-1].shape, -1, jnp.int32))
            continue
        guess = gate_routing(params["layers"][str(i)]["moe"]["router"], inputs[j - 1], moe, state.get(str(i)),
                             auxes[j - 1].routing.carry)
        gates.append(guess.reshape(*shape, -1))
    return {"expert_ids": tuple(ids), "weights": tuple(weights), "gate_ids": tuple(gates)}


def gate_routing(router_params, h: jax.Array, moe: MoEConfig, state=None, carry=None) -> jax.Array:
    """Layer l's router applied to another layer's MoE input h [..., d] (the cross-layer gate):
    the physical experts it would pick, [T, k] int32 with -1 for unused slots. carry: that
    layer's routing carry (what layer l's router would be handed; exact for `pregate`)."""
    xt = h.reshape(-1, moe.d_model)
    xt = xt if moe.dtype is None else xt.astype(moe.dtype)
    r = ffn_routing(ROUTERS.get(moe.router).apply(router_params, xt, moe, state=state, carry=carry), moe)
    keep = r.mask & (r.expert_ids >= 0) & (r.expert_ids < moe.num_experts)
    return jnp.where(keep, r.expert_ids, -1).astype(jnp.int32)
