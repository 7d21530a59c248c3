"""Frequency-based expert pruning: drop the least used experts of each layer.

The kept experts' router columns stay; the softmax over fewer columns renormalises the
router by itself. The number kept per layer comes from the same global allocation as
M-SMoE's dominant experts (`allocate_dominant`).
"""

from __future__ import annotations

import jax
import numpy as np

from jmoe.experts import ExpertList
from jmoe.merge.experts.msmoe import allocate_dominant
from jmoe.merge.experts.registry import CompressMethod, check_target_experts, register_compress_method
from jmoe.merge.experts.stats import check_stats
from jmoe.nn.transformer import LMConfig


LINEAR_ROUTERS = ("topk", "sigmoid_bias", "grouped_softmax", "top_p")


def _check_prunable_layer(moe_cfg, where: str = "") -> None:
    if moe_cfg.expert_map or moe_cfg.router not in LINEAR_ROUTERS:
        raise ValueError(f"pruning supports linear routers without an expert_map, not router={moe_cfg.router!r}"
                         + (" with an expert_map" if moe_cfg.expert_map else "") + where)


def check_prunable(cfg: LMConfig, target_experts: float, source: str = "the model") -> None:
    """ValueError unless `prune_experts` can reduce the MoE layers of `cfg` to
    `target_experts` (checked on the configuration alone)."""
    check_target_experts(cfg, target_experts, source)
    for i in cfg.moe_layers:
        _check_prunable_layer(cfg.moe_for(i), f" (layer {i} of {source})")


def prune_layer(moe_params: dict, moe_cfg, keep) -> tuple[dict, object]:
    """Keep experts `keep` (indices, in the order given) of one MoE layer."""
    E = moe_cfg.num_experts
    keep = np.asarray(keep)
    if keep.ndim != 1 or not (np.issubdtype(keep.dtype, np.integer) or keep.size == 0):
        raise ValueError(f"keep must be a list of expert indices, got {keep.dtype}{keep.shape}")
    if keep.size == 0 or keep.min() < 0 or keep.max() >= E or len(set(keep.tolist())) != keep.size:
        raise ValueError(f"keep={keep.tolist()} must be distinct expert indices in [0, {E})")
    _check_prunable_layer(moe_cfg)
    params = dict(moe_params)
    experts = moe_params["experts"]
    if isinstance(experts, ExpertList):  # e.g. experts quantized to several widths
        params["experts"] = ExpertList([experts.experts[i] for i in keep])
    else:  # stacked leaves, quantized ones included (their codes, scales and zeros are sliced together)
        params["experts"] = jax.tree.map(lambda v: np.asarray(v)[keep], experts)
    r = dict(moe_params["router"])
    r["w"] = np.asarray(r["w"])[:, keep]
    if "bias" in r:
        r["bias"] = np.asarray(r["bias"])[keep]
    params["router"] = r
    changes = dict(num_experts=int(keep.size), top_k=min(moe_cfg.top_k, int(keep.size)))
    groups = getattr(moe_cfg.router_options, "expert_groups", None)
    if groups is not None and keep.size % groups:  # the groups no longer divide the experts
        changes["router_options"] = dict(expert_groups=1, topk_groups=1)
    new_cfg = moe_cfg.replace(**changes)
    return params, new_cfg


def prune_experts(params: dict, cfg: LMConfig, stats: dict, target_experts: float) -> tuple[dict, LMConfig, dict]:
    """Keep about `target_experts` most used experts per layer (global allocation).

    Returns (params, cfg with per-layer MoE configs, {layer: kept expert indices}).
    """
    check_prunable(cfg, target_experts)
    check_stats(stats, cfg, "stats")
    layers = [str(i) for i in cfg.moe_layers]
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


def _reduce(params, cfg, stats, target_experts, *, align, router, calib, seed):
    new, new_cfg, kept = prune_experts(params, cfg, stats, target_experts)
    return new, new_cfg, {l: ("keep", k) for l, k in kept.items()}, {"kept": {l: k.tolist() for l, k in kept.items()}}


register_compress_method(CompressMethod("prune", _reduce, merges=False, check=check_prunable,
                                        doc="keep the most used experts"))
