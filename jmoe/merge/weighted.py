"""Merges weighted by statistics of each model's data: Fisher averaging and RegMean.

fisher: theta = sum_i c_i (F_i + eps) theta_i / sum_i c_i (F_i + eps), with F_i the diagonal
  Fisher of model i (`diagonal_fisher`) and c_i the model weights, by default divided by
  each model's Fisher norm (normalize_fisher) so that no model dominates by scale.
regmean: for a linear map used as x @ W with inputs X_i in model i, the W minimising
  sum_i ||X_i W - X_i W_i||^2 is (sum_i G_i)^-1 sum_i G_i W_i with G_i = X_i^T X_i / n_i;
  alpha < 1 shrinks the off-diagonal Gram entries (alpha G + (1 - alpha) diag G). Leaves
  without a Gram matrix are averaged. `lm_grams` collects the Gram matrices of every linear
  input of a jmoe language model, MoE experts included (each expert sees its routed tokens).
"""

from __future__ import annotations

import math

from functools import partial
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp

from jmoe.merge.methods import _f32, _per_model, _scalar, map_merge
from jmoe.merge.registry import Param, merge_method
from jmoe.merge.tree import MergeError, check_compatible, check_models, leaves_with_paths


def diagonal_fisher(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batches: Iterable[Any], *,
                    per_example: bool = False) -> Any:
    """The diagonal empirical Fisher E[(d loss / d theta)^2] as a tree like `params`.

    loss_fn(params, batch) -> scalar. per_example=True squares the gradient of every example
    (the batch's leading axis) separately; otherwise each batch's gradient is squared.
    """
    grad = jax.jit(jax.grad(loss_fn))

    @jax.jit
    def example_sq(params, batch):
        single = jax.grad(lambda p, ex: loss_fn(p, jax.tree.map(lambda a: a[None], ex)))
        g = jax.vmap(single, in_axes=(None, 0))(params, batch)
        return jax.tree.map(lambda a: jnp.sum(a.astype(jnp.float32) ** 2, axis=0), g)

    total, count = None, 0
    for batch in batches:
        if per_example:
            sq = example_sq(params, batch)
            count += int(jax.tree.leaves(batch)[0].shape[0])
        else:
            sq = jax.tree.map(lambda a: a.astype(jnp.float32) ** 2, grad(params, batch))
            count += 1
        total = sq if total is None else jax.tree.map(jnp.add, total, sq)
    if total is None:
        raise MergeError("diagonal_fisher needs at least one batch")
    return jax.tree.map(lambda a: a / count, total)


@merge_method(Param("weights", per_model=True))
def fisher(models: Sequence, fishers: Sequence, *, weights=None, normalize_fisher: bool = True, eps: float = 1e-6,
           filter=None):
    """Fisher-weighted averaging (Matena & Raffel). No base."""
    check_models(models)
    check_models(fishers, "fishers")
    if len(fishers) != len(models):
        raise MergeError(f"fishers has {len(fishers)} trees for {len(models)} models")
    check_compatible(models[0], list(fishers), [f"fishers[{i}]" for i in range(len(fishers))])
    if not eps >= 0:
        raise MergeError(f"fisher eps={eps!r} must be >= 0")
    n = len(models)
    c = [float(w) for w in _per_model(1.0 / n if weights is None else weights, n, "weights")]
    if normalize_fisher:
        norms = [float(jnp.sqrt(sum(jnp.sum(_f32(f) ** 2) for f in jax.tree.leaves(fi)
                                    if jnp.issubdtype(jnp.asarray(f).dtype, jnp.floating)))) for fi in fishers]
        inv = [1.0 / (v + eps) for v in norms]
        c = [ci * vi / sum(inv) for ci, vi in zip(c, inv)]
    fisher_leaves = [dict(leaves_with_paths(f)) for f in fishers]

    def leaf(path, layers, _b, xs, _k):
        fs = [_f32(fl[path]) + eps for fl in fisher_leaves]
        num = sum(ci * f * _f32(x) for ci, f, x in zip(c, fs, xs))
        den = sum(ci * f for ci, f in zip(c, fs))
        return (num / den).astype(jnp.asarray(xs[0]).dtype)

    return map_merge(leaf, None, models, filter=filter)


@merge_method(Param("alpha", layered=True))
def regmean(models: Sequence, grams: Sequence[dict], *, alpha: float = 1.0, ridge: float = 1e-6, filter=None):
    """RegMean merge of linear weights given each model's Gram matrices.

    grams[i]: {leaf path: G} for model i, G of shape (*batch, n, n) for a weight whose
    leading dimensions (after the batch dimensions) multiply to n, e.g. w_up [E, d, f] with
    G [E, d, d], wq [d, H, Dh] with G [d, d], wo [H, Dh, d] with G [H*Dh, H*Dh].
    Leaves without a Gram matrix are averaged.
    """
    check_models(models)
    if len(grams) != len(models):
        raise MergeError(f"grams has {len(grams)} entries for {len(models)} models")
    keys = set(grams[0])
    for i, g in enumerate(grams):
        if set(g) != keys:
            raise MergeError(f"grams[{i}] covers different leaves than grams[0]: {sorted(set(g) ^ keys)[:3]}")
    paths = dict(leaves_with_paths(models[0]))
    for path in sorted(keys):
        if path not in paths:
            raise MergeError(f"grams[0] has a Gram matrix for {path!r}, which is not a leaf of the models")
        shape = tuple(jnp.shape(paths[path]))
        for i, g in enumerate(grams):
            G = tuple(jnp.shape(g[path]))
            nb = len(G) - 2
            leading = [math.prod(shape[nb:j]) for j in range(nb + 1, len(shape))] if nb >= 0 else []
            if nb < 0 or G[-1] != G[-2] or G[:nb] != shape[:nb] or G[-1] not in leading:
                raise MergeError(f"grams[{i}][{path!r}] has shape {G}, which does not fit the weight {shape} "
                                 "([*batch, n, n], n the product of the weight's leading dimensions)")

    def leaf(path, layers, _b, xs, _k):
        a = _scalar(alpha, path, layers, "alpha")
        if path not in keys:
            return (sum(_f32(x) for x in xs) / len(xs)).astype(jnp.asarray(xs[0]).dtype)
        gs = [_f32(g[path]) for g in grams]
        G0 = gs[0]
        nb = G0.ndim - 2
        n = G0.shape[-1]
        shape = jnp.shape(xs[0])
        eye = jnp.eye(n)
        scaled = [a * g + (1 - a) * g * eye for g in gs]
        ws = [_f32(x).reshape(shape[:nb] + (n, -1)) for x in xs]
        total = sum(scaled)
        total = total + ridge * jnp.mean(jnp.diagonal(total, axis1=-2, axis2=-1), axis=-1)[..., None, None] * eye + 1e-12 * eye
        rhs = sum(g @ w for g, w in zip(scaled, ws))
        merged = jnp.linalg.solve(total, rhs)
        return merged.reshape(shape).astype(jnp.asarray(xs[0]).dtype)

    return map_merge(leaf, None, models, filter=filter)


def lm_grams(params: dict, cfg, batches: Iterable) -> dict:
    """Gram matrices of every linear input of a jmoe language model on calibration batches.

    batches: token arrays [B, S] (or [B, S + 1]; the last column is dropped as a target).
    Returns {leaf path: G}: attention wq/wk/wv (input: the normed residual), wo (the heads'
    outputs), dense FFNs and shared experts (w_gate/w_up: the normed residual, w_down: the
    hidden activations), the router, MoE experts ([E, n, n], each over the tokens routed to
    it) and the unembedding.
    """
    if cfg.attention.kind != "gqa" or cfg.attention.experts:
        what = "attention experts" if cfg.attention.experts else f"{cfg.attention.kind} attention"
        raise ValueError(f"Gram matrices are computed for grouped-query attention; this model has {what}")
    total, count = None, 0
    fn = jax.jit(partial(_lm_grams_one, cfg=cfg))
    for tokens in batches:
        tokens = jnp.asarray(tokens)
        g = fn(params, tokens)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        count += 1
    if total is None:
        raise MergeError("lm_grams needs at least one batch")
    return {k: v / count for k, v in total.items()}


def _gram(x):
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return x.T @ x / x.shape[0]


def _lm_grams_one(params, tokens, cfg):
    from jmoe.experts import ACTIVATIONS
    from jmoe.layer import moe_layer
    from jmoe.nn.attention import attention_heads, rms_norm
    from jmoe.experts import ffn

    if tokens.shape[1] == cfg.max_seq_len + 1:
        tokens = tokens[:, :-1]
    B, S = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(S), (B, S))
    x = jnp.take(params["embed"]["w"], tokens, axis=0).astype(jnp.float32)
    out = {}
    carry = None
    act = ACTIVATIONS.get(cfg.activation)
    for i in range(cfg.n_layers):
        p = params["layers"][str(i)]
        pre = f"layers/{i}"
        h = rms_norm(p["attn_norm"], x, cfg.norm_eps)
        g = _gram(h)
        for w in ("wq", "wk", "wv"):
            out[f"{pre}/attn/{w}"] = g
        heads = attention_heads(p["attn"], h, positions, cfg)
        out[f"{pre}/attn/wo"] = _gram(heads.reshape(B, S, -1))
        x = x + jnp.einsum("bshk,hkd->bsd", heads, p["attn"]["wo"])
        h = rms_norm(p["ffn_norm"], x, cfg.norm_eps)
        hf = h.reshape(-1, cfg.d_model)
        g = _gram(hf)
        if cfg.is_moe_layer(i):
            m = p["moe"]
            mc = cfg.moe_for(i)
            y, aux = moe_layer(m, h, mc, carry=carry)
            carry = aux.routing.carry
            if "w" in m["router"] and m["router"]["w"].ndim == 2:
                out[f"{pre}/moe/router/w"] = g
            routed = jnp.any(jax.nn.one_hot(aux.routing.expert_ids, mc.num_experts, dtype=bool)
                             & aux.routing.mask[..., None], axis=1)  # [N, E]
            cnt = jnp.maximum(jnp.sum(routed, axis=0), 1.0)[:, None, None]
            xe = jnp.where(routed.T[:, :, None], hf[None], 0.0)  # [E, N, d]
            ge = jnp.einsum("end,enf->edf", xe, xe) / cnt
            ex = m["experts"]
            up = jnp.einsum("nd,edf->enf", hf, ex["w_up"])
            hidden = act.fn(jnp.einsum("nd,edf->enf", hf, ex["w_gate"])) * up if act.gated else act.fn(up)
            hidden = jnp.where(routed.T[:, :, None], hidden, 0.0)
            out[f"{pre}/moe/experts/w_up"] = ge
            if act.gated:
                out[f"{pre}/moe/experts/w_gate"] = ge
            out[f"{pre}/moe/experts/w_down"] = jnp.einsum("enf,eng->efg", hidden, hidden) / cnt
            if "shared" in m:
                _ffn_grams(out, f"{pre}/moe/shared", m["shared"], hf, g, act)
            x = x + y
        else:
            _ffn_grams(out, f"{pre}/ffn", p["ffn"], hf, g, act)
            x = x + ffn(p["ffn"], h, cfg.activation)
    x = rms_norm(params["final_norm"], x, cfg.norm_eps)
    if not cfg.tie_embeddings:
        out["unembed/w"] = _gram(x)
    return out


def _ffn_grams(out, prefix, p, hf, g, act):
    up = hf @ p["w_up"]
    hidden = act.fn(hf @ p["w_gate"]) * up if act.gated else act.fn(up)
    out[f"{prefix}/w_up"] = g
    if act.gated:
        out[f"{prefix}/w_gate"] = g
    out[f"{prefix}/w_down"] = _gram(hidden)
