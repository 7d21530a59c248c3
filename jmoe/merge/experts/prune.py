"""Frequency-based expert pruning: drop the least used experts of each layer.

The kept experts' router columns stay; the softmax over fewer columns renormalises the
router by itself. The number kept per layer comes from the same global allocation as
M-SMoE's dominant experts (`allocate_dominant`).
"""

from __future__ import annotations

import numpy as np

from jmoe.merge.experts.msmoe import allocate_dominant
from jmoe.nn.transformer import LMConfig


def prune_layer(moe_params: dict, moe_cfg, keep) -> tuple[dict, object]:
    """Keep experts `keep` (indices, in the order given) of one MoE layer."""
    keep = np.asarray(keep, int)
    E = moe_cfg.num_experts
    if keep.size == 0 or keep.min() < 0 or keep.max() >= E or len(set(keep.tolist())) != keep.size:
        raise ValueError(f"keep={keep.tolist()} must be distinct expert indices in [0, {E})")
    if moe_cfg.expert_map or moe_cfg.router not in ("topk", "sigmoid_bias", "grouped_softmax", "top_p"):
        raise ValueError(f"pruning supports linear routers without an expert_map, not router={moe_cfg.router!r}")
    params = dict(moe_params)
    params["experts"] = {n: np.asarray(v)[keep] for n, v in moe_params["experts"].items()}
    r = dict(moe_params["router"])
    r["w"] = np.asarray(r["w"])[:, keep]
    if "bias" in r:
        r["bias"] = np.asarray(r["bias"])[keep]
    params["router"] = r
    groups = moe_cfg.expert_groups
    new_cfg = moe_cfg.replace(num_experts=int(keep.size), top_k=min(moe_cfg.top_k, int(keep.size)),
                              expert_groups=groups if keep.size % groups == 0 else 1,
                              topk_groups=moe_cfg.topk_groups if keep.size % groups == 0 else 1)
    return params, new_cfg


def prune_experts(params: dict, cfg: LMConfig, stats: dict, target_experts: float) -> tuple[dict, LMConfig, dict]:
    """Keep about `target_experts` most used experts per layer (global allocation).

    Returns (params, cfg with per-layer MoE configs, {layer: kept expert indices}).
    """
    layers = [str(i) for i in cfg.moe_layers]
    E_max = max(cfg.moe_for(int(l)).num_experts for l in layers)
    if not 1 <= target_experts <= E_max:
        raise ValueError(f"target_experts={target_experts} must be between 1 and the {E_max} experts per layer")
    shares = {l: np.asarray(stats["layers"][l]["topk_share"])[: cfg.moe_for(int(l)).num_experts] for l in layers}
    budget = allocate_dominant(shares, target_experts)
    new_params = dict(params)
    new_params["layers"] = dict(params["layers"])
    overrides = dict(cfg.layer_moe)
    kept = {}
    for l in layers:
        keep = np.sort(np.argsort(-shares[l], kind="stable")[: budget[l]])
        moe_params, moe_cfg = prune_layer(params["layers"][l]["moe"], cfg.moe_for(int(l)), keep)
        new_params["layers"][l] = {**params["layers"][l], "moe": moe_params}
        overrides[int(l)] = moe_cfg
        kept[l] = keep
    return new_params, cfg.replace(layer_moe=tuple(sorted(overrides.items()))), kept
