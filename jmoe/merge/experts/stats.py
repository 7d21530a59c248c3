"""Routing statistics of an MoE language model on calibration data.

For every MoE layer: how often each expert is a token's first choice (`top1`) and one of its
choices (`topk`), normalised shares of both, a sample of the raw router logits (tokens x
experts: an expert's column is the vector M-SMoE compares experts by), and the co-activation
of first choices between consecutive MoE layers. A plain dict of numpy arrays (a pytree),
saved with `save_stats` as an .npz next to the checkpoint.
"""

from __future__ import annotations

import zipfile
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
    for n, tokens in enumerate(batches):
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
            raise ValueError(f"batches[{n}] must be a non-empty integer token array [B, S], got "
                             f"{tokens.dtype}{tokens.shape}")
        if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
            raise ValueError(f"batches[{n}] holds token ids in [{tokens.min()}, {tokens.max()}], outside the "
                             f"vocabulary [0, {cfg.vocab_size})")
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


LAYER_KEYS = ("top1", "topk", "top1_share", "topk_share", "logits")


def load_stats(path: str | Path) -> dict:
    """Statistics written by `save_stats`, in the layout `collect_routing_stats` returns.

    Raises a one-line ValueError naming the file when it is missing, not an .npz or not
    routing statistics.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"routing statistics {str(path)!r} do not exist")
    if not path.is_file():
        raise ValueError(f"routing statistics {str(path)!r} are not a file")
    bad = f"{str(path)!r} is not routing statistics saved by jmoe compress"
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise ValueError(f"{bad} (not an .npz file)")
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except ValueError as e:
        if str(e).startswith(bad):
            raise
        raise ValueError(f"{bad} (unreadable .npz: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{bad} (unreadable .npz: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if "tokens" not in arrays or np.shape(arrays["tokens"]) != ():
        raise ValueError(f"{bad} (no token count)")
    stats = {"layers": {}, "coactivation": {}, "tokens": int(arrays["tokens"])}
    for key, value in arrays.items():
        parts = key.split("/")
        if parts[0] == "layers" and len(parts) == 3:
            stats["layers"].setdefault(parts[1], {})[parts[2]] = value
        elif parts[0] == "coactivation" and len(parts) == 2:
            stats["coactivation"][parts[1]] = value
    if not stats["layers"]:
        raise ValueError(f"{bad} (no layers)")
    for layer, s in stats["layers"].items():
        missing = [k for k in LAYER_KEYS if k not in s]
        if missing:
            raise ValueError(f"{bad} (layer {layer} has no {', '.join(missing)})")
    return stats


def check_stats(stats: dict, cfg: LMConfig, source: str = "the routing statistics") -> None:
    """ValueError naming `source` unless `stats` cover every MoE layer of `cfg` with its
    number of experts (statistics of another model cannot steer this one's reduction)."""
    if not isinstance(stats, dict) or not isinstance(stats.get("layers"), dict):
        raise ValueError(f"{source} must be collect_routing_stats' output, a dict with 'layers'")
    layers = [str(i) for i in cfg.moe_layers]
    missing = [l for l in layers if l not in stats["layers"]]
    if missing:
        raise ValueError(f"{source} are of another model: they have no MoE layer {missing[0]} "
                         f"(they cover layers {', '.join(sorted(stats['layers'], key=str)) or 'none'})")
    for l in layers:
        moe = cfg.moe_for(int(l))
        E = len(moe.expert_map) if moe.expert_map else moe.num_experts  # the router's outputs
        s = stats["layers"][l]
        absent = [k for k in ("top1", "topk", "top1_share", "topk_share", "logits") if k not in s]
        if absent:
            raise ValueError(f"{source}: layer {l} has no {absent[0]!r}")
        for k in ("top1", "topk", "top1_share", "topk_share"):
            v = np.asarray(s[k])
            if v.shape != (E,):
                raise ValueError(f"{source} are of another model: layer {l} {k} has shape {v.shape}, "
                                 f"the model has {E} experts")
            if not np.issubdtype(v.dtype, np.number) or not np.all(np.isfinite(v)):
                raise ValueError(f"{source}: layer {l} {k} holds values that are not finite numbers")
        logits = np.asarray(s["logits"])
        if logits.ndim != 2 or logits.shape[1] != E or logits.shape[0] == 0:
            raise ValueError(f"{source} are of another model: layer {l} logits have shape {logits.shape}, "
                             f"expected [tokens, {E}]")


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
