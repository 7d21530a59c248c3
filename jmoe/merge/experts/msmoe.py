"""M-SMoE (Li et al., "Merge, Then Compress", 2024) and the baselines it is compared with.

Per MoE layer l, with its experts' activation shares f (from `collect_routing_stats`):
  1. budget: K_l dominant experts from one global threshold over all layers' shares (each
     layer's most used expert always counts), as the reference code allocates them;
  2. grouping: the K_l most used experts are dominant; every other expert joins the dominant
     expert whose router-logit column is most similar ((cos + 1) / 2);
  3. merging: members are permutation-aligned to their dominant expert (weight or activation
     matching), then averaged weighted by f (uniformly if a group was never used).
The router stays consistent in one of two ways:
  router="share"  the router keeps its E outputs and each maps to its group's merged expert
                  (`MoEConfig.expert_map`, the reference behaviour);
  router="merge"  the router's columns are merged like the experts (frequency-weighted), so it
                  has K_l outputs (smaller, and a Hugging Face export has K_l experts).
Baselines: method="average" (same groups, uniform mean, no alignment) and method="random"
(random groups, uniform mean). Frequency pruning lives in `jmoe.merge.experts.prune`.
"""

from __future__ import annotations

import numpy as np

from jmoe.merge.experts.align import activation_matching, permute_expert, weight_matching
from jmoe.merge.experts.registry import CompressMethod, check_target_experts, register_compress_method
from jmoe.merge.experts.stats import check_stats, router_logit_similarity
from jmoe.nn.transformer import LMConfig

METHODS = ("msmoe", "average", "random")


def allocate_dominant(shares: dict[str, np.ndarray], average: float) -> dict[str, int]:
    """K_l per layer: experts whose share exceeds one global threshold chosen so that the
    layers keep about `average` experts each (every layer keeps its most used expert)."""
    layers = list(shares)
    target = int(round(average * len(layers)))
    modified = {l: np.asarray(shares[l], np.float64).copy() for l in layers}
    for l in layers:
        modified[l][np.argmax(modified[l])] = 1.0
    flat = np.sort(np.concatenate([modified[l] for l in layers]))[::-1]
    E = max(len(v) for v in modified.values())
    if target >= len(flat):
        return {l: len(modified[l]) for l in layers}
    threshold = flat[target - 1] if average >= E else flat[target]
    if threshold >= 1.0:  # fewer experts than layers requested: one each
        return {l: 1 for l in layers}
    return {l: max(1, int(np.sum(modified[l] > threshold))) for l in layers}


def group_by_routing(share: np.ndarray, similarity: np.ndarray, k: int) -> np.ndarray:
    """labels [E]: the k most used experts get labels 0..k-1; each other expert (most used
    first) joins the most similar of them."""
    order = np.argsort(-share, kind="stable")
    dominant = order[:k]
    labels = np.full(len(share), -1)
    labels[dominant] = np.arange(k)
    for e in order[k:]:
        labels[e] = labels[dominant[np.argmax(similarity[e, dominant])]]
    return labels


def random_groups(num_experts: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random labels with every group non-empty."""
    labels = np.concatenate([np.arange(k), rng.integers(0, k, size=num_experts - k)])
    return labels[rng.permutation(num_experts)]


def merge_groups(experts: dict, labels: np.ndarray, weights: np.ndarray, *, align: str | None = "weight",
                 calib: dict | None = None, activation: str = "swiglu") -> dict:
    """Merged experts [K, ...] from stacked experts [E, ...] and group labels.

    Each group's reference is its member with the largest weight; the others are aligned to
    it (align: "weight", "activation" (needs calib {expert: inputs [N, d]}) or None), then the
    group is averaged with `weights` (uniformly when they sum to 0).
    """
    experts = {n: np.asarray(v, np.float32) for n, v in experts.items()}
    E = next(iter(experts.values())).shape[0]
    labels, weights = np.asarray(labels), np.asarray(weights)
    if labels.shape != (E,) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError(f"labels must give each of the {E} experts a group (integers >= 0), got "
                         f"{labels.dtype}{labels.shape}")
    if weights.shape != (E,):
        raise ValueError(f"weights must hold one weight per expert ({E}), got shape {weights.shape}")
    if align == "activation" and calib is None:
        raise ValueError("align='activation' needs calib ({expert: MoE inputs [N, d]})")
    K = int(labels.max()) + 1
    merged = {n: [] for n in experts}
    for g in range(K):
        members = np.flatnonzero(labels == g)
        if members.size == 0:
            raise ValueError(f"group {g} has no experts")
        ref = members[np.argmax(weights[members])]
        one = lambda e: {n: v[e] for n, v in experts.items()}
        aligned = []
        for e in members:
            p = one(e)
            if align and e != ref:
                if align == "weight":
                    perm = weight_matching(one(ref), p)
                elif align == "activation":
                    x = np.concatenate([calib.get(int(ref), np.zeros((0, p["w_up"].shape[0]))),
                                        calib.get(int(e), np.zeros((0, p["w_up"].shape[0])))])
                    perm = activation_matching(one(ref), p, x, activation)
                else:
                    raise ValueError(f"align={align!r} must be 'weight', 'activation' or None")
                p = permute_expert(p, perm)
            aligned.append(p)
        w = np.asarray(weights[members], np.float64)
        w = w / w.sum() if w.sum() > 0 else np.full(len(members), 1.0 / len(members))
        for n in experts:
            merged[n].append(sum(wi * np.asarray(a[n], np.float64) for wi, a in zip(w, aligned)).astype(np.float32))
    return {n: np.stack(v) for n, v in merged.items()}


def apply_groups(moe_params: dict, moe_cfg, labels: np.ndarray, merged: dict, weights: np.ndarray, router: str):
    """The layer's new params and MoEConfig after merging its experts into groups."""
    K = int(labels.max()) + 1
    dtype = np.asarray(moe_params["experts"]["w_up"]).dtype
    params = dict(moe_params)
    params["experts"] = {n: v.astype(dtype) for n, v in merged.items()}
    if router == "share":
        return params, moe_cfg.replace(num_experts=K, expert_map=tuple(int(l) for l in labels))
    if router != "merge":
        raise ValueError(f"router={router!r} must be 'share' or 'merge'")
    r = dict(moe_params["router"])
    w = np.asarray(r["w"], np.float64)
    cols = []
    for g in range(K):
        members = np.flatnonzero(labels == g)
        f = np.asarray(weights[members], np.float64)
        f = f / f.sum() if f.sum() > 0 else np.full(len(members), 1.0 / len(members))
        cols.append(w[:, members] @ f)
    r["w"] = np.stack(cols, axis=1).astype(np.asarray(moe_params["router"]["w"]).dtype)
    if "bias" in r:
        b = np.asarray(r["bias"])
        r["bias"] = np.asarray([b[labels == g].mean() for g in range(K)], b.dtype)
    params["router"] = r
    return params, moe_cfg.replace(num_experts=K, expert_map=None, top_k=min(moe_cfg.top_k, K))


def merge_experts(params: dict, cfg: LMConfig, stats: dict, target_experts: float, *, method: str = "msmoe",
                  align: str | None = "weight", router: str = "share", calib: dict | None = None,
                  seed: int = 0) -> tuple[dict, LMConfig, dict]:
    """Reduce every MoE layer to about `target_experts` experts (on average over layers).

    stats: from `collect_routing_stats`. calib: {layer: {expert: MoE inputs [N, d]}} for
    activation matching. Returns (params, cfg with per-layer MoE configs, {layer: labels}).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    check_mergeable(cfg, target_experts, method=method)
    check_stats(stats, cfg, "stats")
    layers = [str(i) for i in cfg.moe_layers]
    shares = {l: np.asarray(stats["layers"][l]["topk_share"])[: cfg.moe_for(int(l)).num_experts] for l in layers}
    budget = allocate_dominant(shares, target_experts)
    if method == "random":
        budget = {l: int(round(target_experts)) for l in layers}
    rng = np.random.default_rng(seed)
    new_params = dict(params)
    new_params["layers"] = dict(params["layers"])
    overrides = dict(cfg.layer_moe)
    groups = {}
    for l in layers:
        moe_cfg = cfg.moe_for(int(l))
        E, k = moe_cfg.num_experts, budget[l]
        if method == "random":
            labels = random_groups(E, k, rng)
        else:
            sim = router_logit_similarity(np.asarray(stats["layers"][l]["logits"])[:, :E])
            labels = group_by_routing(shares[l], sim, k)
        weights = shares[l] if method == "msmoe" else np.ones(E)
        layer_params = params["layers"][l]["moe"]
        merged = merge_groups(layer_params["experts"], labels, weights,
                              align=align if method == "msmoe" else None,
                              calib=(calib or {}).get(l), activation=moe_cfg.activation)
        moe_params, moe_new = apply_groups(layer_params, moe_cfg, labels, merged, weights, router)
        new_params["layers"][l] = {**params["layers"][l], "moe": moe_params}
        overrides[int(l)] = moe_new
        groups[l] = labels
    new_cfg = cfg.replace(layer_moe=tuple(sorted(overrides.items())))
    return new_params, new_cfg, groups


def check_mergeable(cfg: LMConfig, target_experts: float, *, method: str = "msmoe", source: str = "the model") -> None:
    """ValueError unless `merge_experts(method=method)` can reduce the MoE layers of `cfg` to
    `target_experts` (checked on the configuration alone)."""
    check_target_experts(cfg, target_experts, source)
    for i in cfg.moe_layers:
        if cfg.moe_for(i).expert_map:
            raise ValueError(f"layer {i} of {source} is already merged (it has an expert_map)")
    fewest = min(cfg.moe_for(i).num_experts for i in cfg.moe_layers)
    if method == "random" and round(target_experts) > fewest:
        raise ValueError(f"target_experts={target_experts:g}: method 'random' keeps {round(target_experts)} experts in "
                         f"every MoE layer, and a layer of {source} has {fewest}")


def merging_reducer(method: str):
    """A compress method's `reduce` that merges experts with `merge_experts(method=method)`."""

    def reduce(params, cfg, stats, target_experts, *, align, router, calib, seed):
        new, new_cfg, groups = merge_experts(params, cfg, stats, target_experts, method=method, align=align,
                                             router=router, calib=calib, seed=seed)
        mapping = {l: ("groups", g) for l, g in groups.items()} if router == "merge" else {}
        return new, new_cfg, mapping, {"groups": {l: g.tolist() for l, g in groups.items()}}

    return reduce


def merging_check(method: str):
    """A compress method's `check` for `merging_reducer(method)`."""

    def check(cfg, target_experts, source="the model"):
        check_mergeable(cfg, target_experts, method=method, source=source)

    return check


register_compress_method(CompressMethod("msmoe", merging_reducer("msmoe"), aligns=True, check=merging_check("msmoe"),
                                        doc="M-SMoE: group by routing, align, frequency-weighted merge"))
register_compress_method(CompressMethod("average", merging_reducer("average"), check=merging_check("average"),
                                        doc="M-SMoE's groups, uniform mean, no alignment"))
register_compress_method(CompressMethod("random", merging_reducer("random"), check=merging_check("random"),
                                        doc="random groups, uniform mean"))
