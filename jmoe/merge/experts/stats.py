"""Routing statistics of an MoE language model on calibration data.

For every MoE layer: how often each expert is a token's first choice (`top1`) and one of its
choices (`topk`), normalised shares of both, a sample of the raw router logits (tokens x
experts: an expert's column is the vector M-SMoE compares experts by), and the co-activation
of first choices between consecutive MoE layers. A plain dict of numpy arrays (a pytree),
saved with `save_stats` as an .npz next to the checkpoint.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.nn.transformer import LMConfig, lm_apply


@partial(jax.jit, static_argnames="cfg")
def _routing(params, tokens, cfg, router_state):
    _, aux = lm_apply(params, tokens, cfg, state=router_state)
    return [(a.routing.expert_ids, a.routing.mask, a.routing.logits) for a in aux.moe]


def collect_routing_stats(params: dict, cfg: LMConfig, batches: Iterable, *, router_state=None,
                          max_logit_tokens: int = 4096) -> dict:
    """Statistics over calibration batches ([B, S] or [B, S+1] token arrays).

    Returns {"layers": {layer: {"top1", "topk": [C] counts, "top1_share", "topk_share": [C],
    "logits": [N, C] sample}}, "coactivation": {"a->b": [C_a, C_b]}, "tokens": int}.
    """
    layers = [str(i) for i in cfg.moe_layers]
    out = {l: {"top1": 0, "topk": 0, "logits": []} for l in layers}
    coact: dict[str, np.ndarray] = {}
    tokens_seen = 0
    kept = 0
    for tokens in batches:
        tokens = np.asarray(tokens)
        if tokens.shape[1] > cfg.max_seq_len:
            tokens = tokens[:, : cfg.max_seq_len]
        res = _routing(params, jnp.asarray(tokens), cfg, router_state)
        firsts = []
        for l, (ids, mask, logits) in zip(layers, res):
            ids, mask, logits = np.asarray(ids), np.asarray(mask), np.asarray(logits)
            C = logits.shape[-1]
            out[l]["top1"] = out[l]["top1"] + np.bincount(ids[:, 0][mask[:, 0]], minlength=C)
            out[l]["topk"] = out[l]["topk"] + np.bincount(ids[mask], minlength=C)
            room = max_logit_tokens - kept
            if room > 0:
                out[l]["logits"].append(logits[:room])
            firsts.append(ids[:, 0])
        kept = min(max_logit_tokens, kept + res[0][2].shape[0]) if res else kept
        for a, b, fa, fb in zip(layers, layers[1:], firsts, firsts[1:]):
            ca, cb = out[a]["logits"][0].shape[-1], out[b]["logits"][0].shape[-1]
            m = np.zeros((ca, cb))
            np.add.at(m, (fa, fb), 1)
            coact[f"{a}->{b}"] = coact.get(f"{a}->{b}", 0) + m
        tokens_seen += tokens.size
    if tokens_seen == 0:
        raise ValueError("collect_routing_stats needs at least one calibration batch")
    stats = {"layers": {}, "coactivation": coact, "tokens": tokens_seen}
    for l, s in out.items():
        top1, topk = np.asarray(s["top1"], np.float64), np.asarray(s["topk"], np.float64)
        stats["layers"][l] = {
            "top1": top1, "topk": topk,
            "top1_share": top1 / max(top1.sum(), 1.0), "topk_share": topk / max(topk.sum(), 1.0),
            "logits": np.concatenate(s["logits"], axis=0).astype(np.float32),
        }
    return stats


def save_stats(stats: dict, path: str | Path) -> Path:
    """Write `collect_routing_stats` output to a compressed .npz; returns the .npz path."""
    flat = {"tokens": np.asarray(stats["tokens"])}
    for l, s in stats["layers"].items():
        for k, v in s.items():
            flat[f"layers/{l}/{k}"] = v
    for k, v in stats["coactivation"].items():
        flat[f"coactivation/{k}"] = v
    path = Path(path)
    np.savez_compressed(path, **flat)
    return path if path.suffix == ".npz" else path.with_suffix(".npz")


def load_stats(path: str | Path) -> dict:
    """Statistics written by `save_stats`, in the layout `collect_routing_stats` returns."""
    data = np.load(path)
    stats = {"layers": {}, "coactivation": {}, "tokens": int(data["tokens"])}
    for key in data.files:
        parts = key.split("/")
        if parts[0] == "layers":
            stats["layers"].setdefault(parts[1], {})[parts[2]] = data[key]
        elif parts[0] == "coactivation":
            stats["coactivation"][parts[1]] = data[key]
    return stats


def router_logit_similarity(logits: np.ndarray) -> np.ndarray:
    """[C, C] similarity of experts as (cos + 1) / 2 of their router-logit columns (M-SMoE)."""
    x = logits.astype(np.float64)
    n = np.linalg.norm(x, axis=0)
    cos = (x.T @ x) / np.maximum(np.outer(n, n), 1e-12)
    return (np.clip(cos, -1, 1) + 1) / 2


@partial(jax.jit, static_argnames="cfg")
def _inputs_and_routing(params, tokens, cfg, router_state):
    _, aux = lm_apply(params, tokens, cfg, state=router_state, keep_moe_inputs=True)
    return [(h.reshape(-1, h.shape[-1]), a.routing.expert_ids, a.routing.mask) for h, a in zip(aux.moe_inputs, aux.moe)]


def collect_expert_inputs(params: dict, cfg: LMConfig, batches: Iterable, *, router_state=None,
                          max_per_expert: int = 512) -> dict:
    """The MoE inputs routed to each expert, for activation matching.

    Returns {layer: {expert: inputs [N_e, d_model]}} with N_e <= max_per_expert (the first
    tokens, in calibration order, that chose the expert in any of their k slots).
    """
    layers = [str(i) for i in cfg.moe_layers]
    out: dict[str, dict[int, list]] = {l: {} for l in layers}
    count: dict[str, dict[int, int]] = {l: {} for l in layers}
    for tokens in batches:
        tokens = np.asarray(tokens)[:, : cfg.max_seq_len]
        for l, (h, ids, mask) in zip(layers, _inputs_and_routing(params, jnp.asarray(tokens), cfg, router_state)):
            h, ids, mask = np.asarray(h, np.float32), np.asarray(ids), np.asarray(mask)
            for e in np.unique(ids[mask]):
                room = max_per_expert - count[l].get(int(e), 0)
                if room <= 0:
                    continue
                rows = np.flatnonzero((mask & (ids == e)).any(axis=-1))[:room]
                out[l].setdefault(int(e), []).append(h[rows])
                count[l][int(e)] = count[l].get(int(e), 0) + rows.size
    return {l: {e: np.concatenate(v) for e, v in d.items()} for l, d in out.items()}
