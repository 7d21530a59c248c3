"""A soft mixture of attention experts (BAM's "soft MoA").

A layer has A attention experts, each a whole grouped-query attention (its own q, k, v and
output projections, biases and q/k norms). Every token attends with all of them, and a
softmax router over the token mixes their outputs:

    y = sum_a p_a(x) * wo_a(attention_a(x)),      p(x) = softmax(x W_r)   [float32]

With `shared_kv` the experts share one key/value projection (BAM's KV sharing): the KV cache
then holds Hkv heads per token instead of A * Hkv, as for one attention.

Parameters (A experts; jmoe's [in, out] layout, see `jmoe.nn.attention`):
  router {"w": [d, A]}
  wq [A, d, H, Dh], wo [A, H, Dh, d], bq [A, H, Dh], q_norm {"scale": [A, ...]}
  wk, wv [A, d, Hkv, Dh] (bk, bv, k_norm likewise), without the A axis when shared_kv.

All experts run as one grouped-query attention over A * H query heads: with separate keys
and values the key/value heads are (a, j) and the query heads (a, j, g); with shared ones the
key/value heads are j and the query heads (j, a, g), so that each query head meets its own
expert's (or the shared) key/value head.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

KV_NAMES = ("wk", "wv", "bk", "bv", "k_norm")
"""The parameters that make keys and values (shared by the experts with shared_kv)."""


def _single(cfg):
    """cfg with one plain attention (what each expert is)."""
    return cfg.replace(attention=dataclasses.replace(cfg.attention, experts=0, shared_kv=False))


def init_attention_experts(key, d_model: int, n_heads: int, n_kv_heads: int, d_head: int, dtype, acfg) -> dict:
    """A experts' parameters (module docstring), each initialised as one attention."""
    from jmoe.nn.attention import _normal, init_attention

    single = dataclasses.replace(acfg, experts=0, shared_kv=False)
    k_router, k_experts = jax.random.split(key)
    experts = [init_attention(k, d_model, n_heads, n_kv_heads, d_head, dtype, single)
               for k in jax.random.split(k_experts, acfg.experts)]
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *experts)
    if acfg.shared_kv:
        for name in KV_NAMES:
            if name in params:
                params[name] = experts[0][name]
    params["router"] = {"w": _normal(k_router, (d_model, acfg.experts), d_model, dtype)}
    return params


def experts_from_attentions(attentions: list[dict], router_w, *, shared_kv: bool = False) -> dict:
    """Attention-expert parameters from A single attentions' parameters (e.g. the attention of
    A dense models, as BAM upcycles them) and router columns `router_w` [d, A]. With
    shared_kv the experts' key/value parameters are averaged into the shared ones."""
    stacked = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *attentions)
    if shared_kv:
        for name in KV_NAMES:
            if name in stacked:
                stacked[name] = jax.tree.map(lambda a: jnp.mean(a.astype(jnp.float32), axis=0).astype(a.dtype),
                                             stacked[name])
    if router_w.shape != (stacked["wq"].shape[1], len(attentions)):
        raise ValueError(f"router_w has shape {tuple(router_w.shape)}, expected (d_model, experts) = "
                         f"{(stacked['wq'].shape[1], len(attentions))}")
    stacked["router"] = {"w": jnp.asarray(router_w)}
    return stacked


def router_probs(params: dict, x: jax.Array) -> jax.Array:
    """x: [B, S, d] -> [B, S, A] float32 mixing weights of the experts."""
    logits = jnp.einsum("bsd,da->bsa", x.astype(jnp.float32), params["router"]["w"].astype(jnp.float32))
    return jax.nn.softmax(logits, axis=-1)


def expert_projections(params: dict, x: jax.Array, positions: jax.Array, cfg) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries, keys and values of every expert as one grouped-query attention.

    cfg: an LMConfig with attention experts. x: [B, S, d]; positions: [B, S] ->
    q [B, S, A*H, Dh], k and v [B, S, A*Hkv, Dh] ([B, S, Hkv, Dh] with shared_kv), in the
    head order of the module docstring.
    """
    from jmoe.nn.attention import gqa_projections

    acfg = cfg.attention
    shared = acfg.shared_kv
    single = _single(cfg)
    per_expert = {k: v for k, v in params.items() if k != "router"}
    axes = {k: (None if shared and k in KV_NAMES else 0) for k in per_expert}
    kv_axis = None if shared else 0
    q, k, v = jax.vmap(lambda p: gqa_projections(p, x, positions, single), in_axes=(axes,),
                       out_axes=(0, kv_axis, kv_axis))(per_expert)
    A, B, S, H, D = q.shape
    Hkv = k.shape[-2]
    q = q.reshape(A, B, S, Hkv, H // Hkv, D)
    if shared:  # query heads (j, a, g) over key/value heads j
        return q.transpose(1, 2, 3, 0, 4, 5).reshape(B, S, A * H, D), k, v
    q = q.transpose(1, 2, 0, 3, 4, 5).reshape(B, S, A * H, D)  # query heads (a, j, g) over (a, j)
    merge = lambda t: t.transpose(1, 2, 0, 3, 4).reshape(B, S, A * Hkv, t.shape[-1])
    return q, merge(k), merge(v)


def mix_experts(params: dict, heads: jax.Array, x: jax.Array, cfg) -> jax.Array:
    """The router-weighted sum of the experts' output projections.

    heads: [B, S, A*H, Dv] attention outputs in the query-head order of
    `expert_projections`; x: [B, S, d] the attention's input (what the router reads) ->
    [B, S, d] in x's dtype.
    """
    acfg = cfg.attention
    A = acfg.experts
    B, S, AH, Dv = heads.shape
    H = AH // A
    Hkv = cfg.kv_heads
    if acfg.shared_kv:
        heads = heads.reshape(B, S, Hkv, A, H // Hkv, Dv).transpose(0, 1, 3, 2, 4, 5)
    heads = heads.reshape(B, S, A, H, Dv)
    weighted = heads * router_probs(params, x)[..., None, None].astype(heads.dtype)
    return jnp.einsum("bsahk,ahkd->bsd", weighted, params["wo"].astype(heads.dtype)).astype(x.dtype)
