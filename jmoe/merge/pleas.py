"""PLeaS (Nasery et al., CVPR 2025, "PLeaS: Merging Models with Permutations and Least
Squares"; reference code SewoongLab/PLeaS-Merging): two models of one architecture trained
from different initialisations merged into one model of a chosen width.

  1. Matching (the reference's activation matching): both models read the same inputs; units
     are matched by the negative Euclidean distance between their activations over every
     position (`scipy.optimize.linear_sum_assignment`). The residual stream is one
     permutation group (embeddings, every block's input and output, the final norm: a
     residual add ties them); each dense FFN's hidden units are another.
  2. Partial merge: of each FFN's matched pairs, the best-matching (1 - ratio) fraction is
     merged (weights averaged) and the other `ratio` fraction of each model's units is kept
     as it is, so the FFN is d_ff * (1 + ratio) wide (the reference's `get_blocks`: 0 a full
     merge, 1 both FFNs side by side). Merged units read the average of the two models'
     inputs and separate ones their own model's weights; the down projection averages the
     two models' contributions (the reference's `build_partial_merge_model`).
  3. Least squares, layer by layer: every linear map is refit so that, applied to the
     merged-basis average of the two models' own inputs, it gives the merged-basis outputs of
     the two originals (the reference's per-layer objective, with the original models'
     activations as inputs, so layers are independent). The reference takes 400 Adam steps
     from the permuted weights; here each layer is solved in closed form with a ridge towards
     them, W = (X^T X + l I)^-1 (X^T Y + l W0), l = `ridge` * mean diagonal of X^T X.

Deliberate differences for transformers (the reference supports convolutional and linear
layers only): attention is not merged but kept whole from both models, their heads side by
side with the output projection averaging them (permuting within heads would break RoPE's
pairs); the chosen width applies to the FFNs; the residual stream is merged in full
(ratio 0), since widening it would change what every RMSNorm normalises over; norm scales and
embeddings are averaged after the permutation. `ratio` 1 with `least_squares=False` is the
average of the two models' attention and FFN contributions on a shared residual stream.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from jmoe.merge.tree import MergeError
from jmoe.registry import ACTIVATIONS


def _check(cfg, params_a: dict, params_b: dict, batches, ratio, ridge) -> None:
    from jmoe.merge.entropy_merging import check_token_batches
    from jmoe.merge.routed import check_lm_params

    if cfg.moe is not None or cfg.adapter is not None:
        raise MergeError("pleas merges dense models without adapters (cfg.moe and cfg.adapter must be None)")
    att = cfg.attention
    if att.kind != "gqa" or att.experts or att.qk_norm or att.qkv_bias:
        raise MergeError("pleas merges grouped-query attention without q/k norms, biases or attention experts")
    check_lm_params("pleas", cfg, params_a, "params_a")
    check_lm_params("pleas", cfg, params_b, "params_b")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise MergeError(f"pleas: ratio={ratio!r} must be a number in [0, 1]")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
        raise MergeError(f"pleas: ridge={ridge!r} must be a number > 0")
    if not isinstance(batches, (list, tuple)) or not batches:
        raise MergeError("pleas needs batches: a non-empty list of token arrays [B, S]")
    check_token_batches("pleas", batches, cfg.vocab_size, masked=False)


@dataclasses.dataclass
class Activations:
    """One model's activations over the calibration tokens, [N, ...] rows per position."""

    resid: list      # residual stream states (embeddings, after every attention and FFN add) [N, d]
    attn_in: list    # per layer: the attention's normed input [N, d]
    heads: list      # per layer: the heads before the output projection [N, H, Dh]
    attn_out: list   # per layer: the attention's output [N, d]
    ffn_in: list     # per layer: the FFN's normed input [N, d]
    hidden: list     # per layer: the FFN's hidden activations [N, f]
    ffn_out: list    # per layer: the FFN's output [N, d]
    final: Any       # the final norm's output [N, d]


def record(params: dict, cfg, batches: Sequence) -> Activations:
    """The activations PLeaS matches and fits on, over every position of every batch."""
    from jmoe.nn.attention import attention_heads, attention_out, rms_norm
    from jmoe.nn.transformer import embed

    activation = ACTIVATIONS.get(cfg.activation)

    @jax.jit
    def one(tokens):
        B, S = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        x = embed(params, tokens, cfg)
        out = {k: [] for k in ("resid", "attn_in", "heads", "attn_out", "ffn_in", "hidden", "ffn_out")}
        out["resid"].append(x)
        for i in range(cfg.n_layers):
            p = params["layers"][str(i)]
            h = rms_norm(p["attn_norm"], x, cfg.norm_eps)
            heads = attention_heads(p["attn"], h, positions, cfg).astype(x.dtype)
            a = attention_out(p["attn"], heads, h, cfg)
            x = x + a
            h2 = rms_norm(p["ffn_norm"], x, cfg.norm_eps)
            f = p["ffn"]
            up = h2 @ f["w_up"]
            act = activation.fn(h2 @ f["w_gate"]) * up if activation.gated else activation.fn(up)
            y = act @ f["w_down"]
            x = x + y
            for k, v in (("attn_in", h), ("heads", heads), ("attn_out", a), ("ffn_in", h2), ("hidden", act),
                         ("ffn_out", y), ("resid", x)):
                out[k].append(v)
        out["final"] = rms_norm(params["final_norm"], x, cfg.norm_eps)
        return out

    rows = [one(jnp.asarray(t)) for t in batches]
    flat = lambda v: np.concatenate([np.asarray(r, np.float32).reshape(-1, *r.shape[2:]) for r in v])
    return Activations(**{k: [flat([r[k][i] for r in rows]) for i in range(len(rows[0][k]))]
                          for k in ("resid", "attn_in", "heads", "attn_out", "ffn_in", "hidden", "ffn_out")},
                       final=flat([r["final"] for r in rows]))


def match(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(perm, score): unit perm[i] of b matched to unit i of a, maximising the summed negative
    Euclidean distance between their activations over the arrays of a and b ([N, units]
    each, in pairs); score[i] is the matched pair's."""
    n = a[0].shape[-1]
    sq = np.zeros((n, n))
    for x, y in zip(a, b):
        x, y = x.astype(np.float64), y.astype(np.float64)
        sq += (x * x).sum(0)[:, None] + (y * y).sum(0)[None, :] - 2.0 * x.T @ y
    cost = -np.sqrt(np.maximum(sq, 0.0))
    rows, cols = linear_sum_assignment(cost, maximize=True)
    perm = np.empty(n, np.int64)
    perm[rows] = cols
    return perm, cost[np.arange(n), perm]


def permute_residual(params: dict, cfg, perm: np.ndarray) -> dict:
    """params with the residual stream's units reordered: new unit i is old unit perm[i]
    (an equivalent model)."""
    p = jax.tree.map(np.asarray, params)
    out = {"embed": {"w": p["embed"]["w"][:, perm]}, "final_norm": {"scale": p["final_norm"]["scale"][perm]},
           "layers": {}}
    if "unembed" in p:
        out["unembed"] = {"w": p["unembed"]["w"][perm]}
    for i, layer in p["layers"].items():
        att, f = layer["attn"], layer["ffn"]
        out["layers"][i] = {
            "attn_norm": {"scale": layer["attn_norm"]["scale"][perm]},
            "ffn_norm": {"scale": layer["ffn_norm"]["scale"][perm]},
            "attn": {**att, "wq": att["wq"][perm], "wk": att["wk"][perm], "wv": att["wv"][perm],
                     "wo": att["wo"][..., perm]},
            "ffn": {**{k: w[perm] for k, w in f.items() if k in ("w_gate", "w_up")}, "w_down": f["w_down"][:, perm]},
        }
    return out


def ridge_fit(x: np.ndarray, y: np.ndarray, w0: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_W |x W - y|^2 + l |W - w0|^2, l = ridge * mean diagonal of x^T x.
    x [N, a], y [N, b], w0 [a, b] -> [a, b]."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    g = x64.T @ x64
    lam = ridge * max(float(np.mean(np.diag(g))), 1e-12)
    return np.linalg.solve(g + lam * np.eye(g.shape[0]), x64.T @ y64 + lam * w0.astype(np.float64))


def pleas(cfg, params_a: dict, params_b: dict, batches: Sequence, *, ratio: float = 0.5,
          least_squares: bool = True, ridge: float = 1e-3) -> tuple[Any, dict]:
    """Merge two dense jmoe LMs of LMConfig `cfg` (see the module docstring); batches: token
    arrays [B, S] the two models read for matching and fitting (e.g. inputs of both models'
    tasks). ratio: the fraction of each FFN's units kept separate from each model (the FFN is
    d_ff * (1 + ratio) wide). Returns (the merged model's LMConfig: d_ff and the heads
    widened, its params)."""
    _check(cfg, params_a, params_b, batches, ratio, ridge)
    dtype = jax.tree.leaves(params_a)[0].dtype
    act_a = record(params_a, cfg, batches)
    act_b = record(params_b, cfg, batches)
    perm, _ = match(act_a.resid, act_b.resid)
    b = permute_residual(params_b, cfg, perm)
    pa = jax.tree.map(np.asarray, params_a)
    res = lambda v: v[:, perm]  # B's residual-stream activations [N, d] in A's order
    H, Hkv, Dh, f = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.d_ff
    keep = int(round(float(ratio) * f))  # units of each model kept separate
    gated = "w_gate" in pa["layers"]["0"]["ffn"]
    avg = lambda x, y: (x.astype(np.float32) + y.astype(np.float32)) / 2
    out = {"embed": {"w": avg(pa["embed"]["w"], b["embed"]["w"])},
           "final_norm": {"scale": avg(pa["final_norm"]["scale"], b["final_norm"]["scale"])}, "layers": {}}
    if "unembed" in pa:
        w0 = avg(pa["unembed"]["w"], b["unembed"]["w"])
        if least_squares:
            target = (act_a.final @ pa["unembed"]["w"] + act_b.final @ np.asarray(params_b["unembed"]["w"])) / 2
            w0 = ridge_fit(avg(act_a.final, res(act_b.final)), target, w0, ridge)
        out["unembed"] = {"w": w0}
    for li in range(cfg.n_layers):
        i = str(li)
        la, lb, lb_orig = pa["layers"][i], b["layers"][i], params_b["layers"][i]
        att = {}
        x_att = avg(act_a.attn_in[li], res(act_b.attn_in[li]))
        for name in ("wq", "wk", "wv"):
            w0 = np.concatenate([la["attn"][name], lb["attn"][name]], axis=1)  # [d, 2h, Dh]
            if least_squares:
                ya = act_a.attn_in[li] @ la["attn"][name].reshape(cfg.d_model, -1)
                yb = act_b.attn_in[li] @ np.asarray(lb_orig["attn"][name]).reshape(cfg.d_model, -1)
                w0 = ridge_fit(x_att, np.concatenate([ya, yb], 1), w0.reshape(cfg.d_model, -1), ridge).reshape(w0.shape)
            att[name] = w0
        wo = np.concatenate([la["attn"]["wo"], lb["attn"]["wo"]], axis=0) / 2  # [2H, Dh, d]
        if least_squares:
            x = np.concatenate([act_a.heads[li].reshape(len(x_att), -1), act_b.heads[li].reshape(len(x_att), -1)], 1)
            wo = ridge_fit(x, avg(act_a.attn_out[li], res(act_b.attn_out[li])), wo.reshape(2 * H * Dh, -1),
                           ridge).reshape(wo.shape)
        att["wo"] = wo
        # FFN: the hidden units matched, the best (1 - ratio) of the pairs merged
        fa, fb = la["ffn"], lb["ffn"]
        hperm, score = match([act_a.hidden[li]], [act_b.hidden[li]])
        order = np.argsort(-score, kind="stable")
        merged_a, sep_a = np.sort(order[: f - keep]), np.sort(order[f - keep:])
        merged_b, sep_b = hperm[merged_a], hperm[sep_a]
        new_ffn = {}
        for name in (("w_gate", "w_up") if gated else ("w_up",)):
            w0 = np.concatenate([avg(fa[name][:, merged_a], fb[name][:, merged_b]), fa[name][:, sep_a],
                                 fb[name][:, sep_b]], axis=1)
            if least_squares:
                ya = act_a.ffn_in[li] @ fa[name]
                yb = act_b.ffn_in[li] @ np.asarray(lb_orig["ffn"][name])
                y = np.concatenate([avg(ya[:, merged_a], yb[:, merged_b]), ya[:, sep_a], yb[:, sep_b]], 1)
                w0 = ridge_fit(avg(act_a.ffn_in[li], res(act_b.ffn_in[li])), y, w0, ridge)
            new_ffn[name] = w0
        down = np.concatenate([avg(fa["w_down"][merged_a], fb["w_down"][merged_b]), fa["w_down"][sep_a] / 2,
                               fb["w_down"][sep_b] / 2], axis=0)
        if least_squares:
            ha, hb = act_a.hidden[li], act_b.hidden[li]
            x = np.concatenate([avg(ha[:, merged_a], hb[:, merged_b]), ha[:, sep_a], hb[:, sep_b]], 1)
            down = ridge_fit(x, avg(act_a.ffn_out[li], res(act_b.ffn_out[li])), down, ridge)
        new_ffn["w_down"] = down
        out["layers"][i] = {"attn_norm": {"scale": avg(la["attn_norm"]["scale"], lb["attn_norm"]["scale"])},
                            "ffn_norm": {"scale": avg(la["ffn_norm"]["scale"], lb["ffn_norm"]["scale"])},
                            "attn": att, "ffn": new_ffn}
    new_cfg = cfg.replace(d_ff=f + keep, n_heads=2 * H, n_kv_heads=2 * Hkv, d_head=Dh)
    return new_cfg, jax.tree.map(lambda x: jnp.asarray(x, dtype), out)
