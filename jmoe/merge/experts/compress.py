"""MC-SMoE compression: every expert weight W [in, out] becomes L R + S.

L R is the rank-r truncated SVD with the singular values split evenly (L = U_r sqrt(S_r),
R = sqrt(S_r) V_r^T); S is the residual W - L R restricted to whole output units (columns of
W; rows of the Hugging Face [out, in] weight), the structured sparsity of the reference code.
Which columns of S survive is decided by one global threshold over every compressed matrix,
by importance: "magnitude" (mean |S| of the column) or "sensitivity" (mean |S * dL/dW|, the
gradient of the LM loss on calibration data). Storage: r (in + out) + kept columns * in
(+ their indices). The model keeps computing with the reconstructed dense W; `compressed`
holds the factors and the report counts their size.
"""

from __future__ import annotations

import numpy as np

from jmoe.merge.experts.msmoe import merging_check, merging_reducer
from jmoe.merge.experts.registry import CompressMethod, register_compress_method
from jmoe.nn.transformer import LMConfig

NAMES = ("w_gate", "w_up", "w_down")


def low_rank(W: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(L [m, r], R [r, n]) with L R the best rank-r approximation of W [m, n]."""
    m, n = W.shape
    if not 0 <= rank <= min(m, n):
        raise ValueError(f"rank={rank} must be in [0, {min(m, n)}] for a {m}x{n} matrix")
    u, s, vt = np.linalg.svd(np.asarray(W, np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def compressed_size(m: int, n: int, rank: int, kept_columns: int) -> int:
    """Parameters of L R + S: the factors, the kept columns and their indices."""
    return rank * (m + n) + kept_columns * (m + 1)


def check_low_rank(cfg: LMConfig, rank: int, budget: float | None = None, source: str = "the model") -> None:
    """ValueError unless every expert matrix of `cfg`'s MoE layers has room for `rank`, and
    `budget` (a fraction of the experts' size) for the rank-`rank` factors (checked on the
    configuration alone)."""
    ratios = []
    for i in cfg.moe_layers:
        moe = cfg.moe_for(i)
        m, n = moe.d_model, moe.d_ff
        if rank > min(m, n):
            raise ValueError(f"rank={rank} is larger than the {m}x{n} expert matrices of layer {i} of {source}")
        ratios.append(rank * (m + n) / (m * n))
    if budget is not None and ratios and budget < min(ratios):
        raise ValueError(f"budget={budget:g} is below the size of the rank-{rank} factors alone "
                         f"({min(ratios):.3f} of the experts of {source})")


def compress_experts(params: dict, cfg: LMConfig, *, rank: int, sparsity: float | None = None,
                     budget: float | None = None, importance: str = "magnitude",
                     grads: dict | None = None) -> tuple[dict, dict, dict]:
    """Compress every MoE layer's experts to low rank + column-sparse residual.

    rank: r of every matrix; sparsity: fraction of S's entries dropped, as whole columns, by one
    global importance threshold (0 keeps S whole, 1 drops it); or instead budget: the stored
    size (factors + kept columns with their indices) as a fraction of the dense experts'. grads: {layer: {name: dL/dW
    [E, in, out]}} for importance="sensitivity".
    Returns (params with reconstructed weights, compressed {layer: {name: {"L", "R", "cols",
    "S"}}}, report with parameter counts before/after).
    """
    if (sparsity is None) == (budget is None):
        raise ValueError("compress_experts needs exactly one of sparsity or budget")
    if sparsity is not None and not 0 <= sparsity <= 1:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1]")
    if budget is not None and not 0 < budget <= 1:
        raise ValueError(f"budget={budget} must be in (0, 1]")
    if importance not in ("magnitude", "sensitivity"):
        raise ValueError(f"importance={importance!r} must be 'magnitude' or 'sensitivity'")
    if importance == "sensitivity" and grads is None:
        raise ValueError("importance='sensitivity' needs grads (see expert_gradients)")
    layers = [str(i) for i in cfg.moe_layers]
    factors, scores = {}, {}  # scores[(layer, name)]: [E, n] column importance
    for l in layers:
        experts = params["layers"][l]["moe"]["experts"]
        factors[l] = {}
        for name in NAMES:
            if name not in experts:
                continue
            W = np.asarray(experts[name], np.float64)
            E, m, n = W.shape
            if rank > min(m, n):
                raise ValueError(f"rank={rank} is larger than the {m}x{n} matrices of layer {l} {name}")
            Ls, Rs = zip(*(low_rank(W[e], rank) for e in range(E)))
            L, R = np.stack(Ls), np.stack(Rs)
            S = W - np.einsum("emr,ern->emn", L, R)
            imp = np.abs(S) if importance == "magnitude" else np.abs(S * np.asarray(grads[l][name], np.float64))
            factors[l][name] = (L, R, S)
            scores[(l, name)] = imp.mean(axis=1)
    # one global threshold: the most important columns of all matrices, up to the budget
    keys = list(scores)
    flat = np.concatenate([scores[k].ravel() for k in keys]) if keys else np.zeros(0)
    sizes = np.concatenate([np.full(scores[k].size, factors[k[0]][k[1]][2].shape[1]) for k in keys]) if keys else np.zeros(0)
    order = np.argsort(-flat, kind="stable")
    if budget is None:
        cost, capacity = sizes, (1 - sparsity) * sizes.sum()
    else:
        dense = sum(S.size for f in factors.values() for (_, _, S) in f.values())
        factor_size = sum(L.size + R.size for f in factors.values() for (L, R, _) in f.values())
        cost, capacity = sizes + 1, budget * dense - factor_size
        if capacity < 0:
            raise ValueError(f"budget={budget} is below the size of the rank-{rank} factors alone "
                             f"({factor_size / dense:.3f} of the experts)")
    kept_flat = np.zeros(flat.size, bool)
    kept_flat[order[np.cumsum(cost[order]) <= capacity + 1e-9]] = True
    masks, start = {}, 0
    for k in keys:
        masks[k] = kept_flat[start:start + scores[k].size].reshape(scores[k].shape)
        start += scores[k].size
    new_params = dict(params)
    new_params["layers"] = dict(params["layers"])
    compressed = {}
    before = after = 0
    for l in layers:
        experts = dict(params["layers"][l]["moe"]["experts"])
        compressed[l] = {}
        for name, (L, R, S) in factors[l].items():
            E, m, n = S.shape
            mask = masks[(l, name)]
            dtype = np.asarray(experts[name]).dtype
            experts[name] = (np.einsum("emr,ern->emn", L, R) + S * mask[:, None, :]).astype(dtype)
            compressed[l][name] = {"L": L.astype(np.float32), "R": R.astype(np.float32),
                                   "cols": [np.flatnonzero(mask[e]) for e in range(E)],
                                   "S": [S[e][:, mask[e]].astype(np.float32) for e in range(E)]}
            before += E * m * n
            after += sum(compressed_size(m, n, rank, int(mask[e].sum())) for e in range(E))
        new_params["layers"][l] = {**params["layers"][l], "moe": {**params["layers"][l]["moe"], "experts": experts}}
    kept_entries = sum(int(masks[k].sum()) * factors[k[0]][k[1]][2].shape[1] for k in keys)
    report = {"rank": rank, "sparsity": 1 - kept_entries / max(1, int(sizes.sum())), "budget": budget,
              "importance": importance,
              "expert_params_before": int(before), "expert_params_after": int(after),
              "expert_ratio": after / before if before else 1.0}
    return new_params, compressed, report


def expert_gradients(params: dict, cfg: LMConfig, batches, router_state=None) -> dict:
    """Mean dL/dW of every MoE expert weight over calibration batches ([B, S+1] tokens)."""
    import jax
    import jax.numpy as jnp

    from jmoe.nn.transformer import lm_apply
    from jmoe.train.trainer import cross_entropy

    @jax.jit
    def grad(p, tokens):
        def loss(p):
            logits, aux = lm_apply(p, tokens[:, :-1], cfg, state=router_state)
            return cross_entropy(logits, tokens[:, 1:])
        return jax.grad(loss)(p)

    total, n = None, 0
    for b in batches:
        g = grad(params, jnp.asarray(b))
        g = {str(i): {k: np.asarray(v) for k, v in g["layers"][str(i)]["moe"]["experts"].items()} for i in cfg.moe_layers}
        total = g if total is None else {l: {k: total[l][k] + g[l][k] for k in g[l]} for l in g}
        n += 1
    return {l: {k: v / n for k, v in d.items()} for l, d in total.items()}


register_compress_method(CompressMethod("mcsmoe", merging_reducer("msmoe"), aligns=True, low_rank=True,
                                        check=merging_check("msmoe"),
                                        doc="MC-SMoE: M-SMoE, then low rank + sparse residual"))
