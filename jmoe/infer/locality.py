"""Locality of expert routing: the metrics that say whether a model suits expert offloading.

Pure functions over a `RoutingTrace` (numpy, vectorised over tokens):

  segment_routing_best_performance   SRP, {m: [L]}: how well one fixed expert set per segment of
                                     m tokens covers the segment's routing (best F1)
  segment_cache_best_hit_rate        SCH, {m: [L]}: hit rate of a cache of C experts that keeps
                                     the experts most used in the next m tokens
  popularity                         [L, E] share of requests per expert
  reuse_distance_histogram           [L, bins] distinct experts (or steps) between two requests
                                     of the same expert
  coactivation                       [L - d, E, E] P(expert j at layer l + d | expert i at layer l)
  report / plot_report               all of them as a JSON-serialisable dict, and as a figure

SRP and SCH follow Liang et al., "Not All Models Suit Expert Offloading: On Local Routing
Consistency of Mixture-of-Expert Models" (arXiv:2505.16056), as computed by their code
(github.com/ljcleo/moe-lrc): SRP by `seg_stat`/`calc_stat` in src/30_srp_calc.py and `refine` in
src/31_srp_refine.py, SCH by `calc_fsf` in src/41_sch_calc.py. Segments never cross sequences.
Their bootstrap confidence intervals are not computed here.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from jmoe.infer.trace import RoutingTrace

DEFAULT_SEGMENT_LENGTHS = (4, 16, 64, 256)  # those of moe-lrc's config.json
REPORT_FORMAT = "jmoe-locality-report"
REPORT_VERSION = 1
_CHUNK = 1 << 14  # rows per block of the vectorised passes (bounds temporary memory)


# ----------------------------------------------------------------------------- checks
def _check_trace(trace) -> None:
    if not isinstance(trace, RoutingTrace):
        raise ValueError(f"trace must be a RoutingTrace, got {type(trace).__name__}")


def _check_lengths(segment_lengths) -> tuple[int, ...]:
    try:
        ms = tuple(segment_lengths)
    except TypeError:
        raise ValueError(f"segment_lengths must be a list of positive integers, got {segment_lengths!r}") from None
    if not ms or not all(isinstance(m, (int, np.integer)) and not isinstance(m, bool) and m >= 1 for m in ms):
        raise ValueError(f"segment_lengths must be a non-empty list of positive integers, got {list(ms)!r}")
    if len(set(ms)) != len(ms):
        raise ValueError(f"segment_lengths has repeated values: {list(ms)!r}")
    return tuple(int(m) for m in ms)


def _check_positive_int(value, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- shared pieces
def _sequences(trace: RoutingTrace) -> list[np.ndarray]:
    """The token indices of each sequence, in processing order (sequences by first token)."""
    order = np.argsort(trace.seq_ids, kind="stable")
    s = trace.seq_ids[order]
    cuts = np.flatnonzero(s[1:] != s[:-1]) + 1
    groups = np.split(order, cuts)
    groups.sort(key=lambda g: g[0])
    return groups


def _counts(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, E] int32 number of slots of each token holding each expert (0 or 1), from ids [T, k]."""
    out = np.zeros((ids.shape[0], num_experts), np.int32)
    rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)
    valid = ids >= 0
    out[rows[valid], ids[valid]] = 1
    return out


# ----------------------------------------------------------------------------- SRP
def _srp_statistics(trace: RoutingTrace, segment_lengths: Sequence[int]) -> dict[int, tuple]:
    """{m: (matches [L, m+1], predictions [L, m+1], activations [L])}, int64.

    For threshold s in 0..m, matches[l, s] sums, over every segment and expert whose count c
    in the segment is >= s, the count c; predictions[l, s] is m times the number of such
    (segment, expert) pairs; activations[l] = matches[l, 0]. As moe-lrc's `calc_stat`.
    """
    seqs = _sequences(trace)
    order = np.concatenate(seqs)
    ids = trace.expert_ids[order]
    lens = np.array([len(g) for g in seqs])
    starts_of_seq = np.concatenate([[0], np.cumsum(lens)[:-1]])
    L, E = trace.num_layers, trace.num_experts
    out = {m: (np.zeros((L, m + 1), np.int64), np.zeros((L, m + 1), np.int64), np.zeros(L, np.int64))
           for m in segment_lengths}
    # window starts per m: every position whose m-token window stays inside its sequence
    win = {m: np.concatenate([s + np.arange(max(n - m + 1, 0)) for s, n in zip(starts_of_seq, lens)]).astype(np.int64)
           for m in segment_lengths}
    for l in range(L):
        cs = np.zeros((ids.shape[0] + 1, E), np.int32)
        np.cumsum(_counts(ids[:, l, :], E), axis=0, out=cs[1:])
        for m in segment_lengths:
            hist = np.zeros(m + 1, np.int64)
            w = win[m]
            for i in range(0, w.size, _CHUNK):
                b = w[i:i + _CHUNK]
                hist += np.bincount((cs[b + m] - cs[b]).ravel(), minlength=m + 1)
            c = np.arange(m + 1, dtype=np.int64)
            matches = np.cumsum((hist * c)[::-1])[::-1]
            preds = np.cumsum(hist[::-1])[::-1] * m
            M, P, A = out[m]
            M[l], P[l], A[l] = matches, preds, matches[0]
    return out


def _best_f1(matches: np.ndarray, preds: np.ndarray, acts) -> np.ndarray:
    f1 = 2.0 * matches / np.maximum(preds + np.asarray(acts)[..., None], 1)
    best = f1.max(axis=-1)
    return np.where((preds[..., 0] > 0) & (np.asarray(acts) > 0), best, np.nan)


def segment_routing_best_performance(trace: RoutingTrace,
                                     segment_lengths: Sequence[int] = DEFAULT_SEGMENT_LENGTHS) -> dict[int, np.ndarray]:
    """Segment routing best performance (SRP) of each MoE layer, per segment length m.

    Definition (Liang et al. 2025, arXiv:2505.16056; code: moe-lrc src/30_srp_calc.py
    `seg_stat`/`calc_stat` and src/31_srp_refine.py `refine`): every window of m consecutive tokens of one sequence is a
    segment (all window positions, stride 1; windows that would cross the end of a sequence
    are not counted, so sequences shorter than m contribute nothing). A segment routing gives
    all m tokens of a segment the same expert set: the experts activated at least s times in
    the segment. Against the true routing it scores the micro-F1 over all (token, expert)
    pairs of all segments of the layer, 2 * matches / (predicted + activated); SRP is the best
    F1 over the shared threshold s in 0..m. (moe-lrc builds windows by doubling, so only powers
    of two; any m >= 1 works here and gives the same numbers for those.)

    Args:
      trace: the routing trace.
      segment_lengths: the segment lengths m (positive integers).

    Returns:
      {m: [L] float64}, in [0, 1]; NaN for a layer with no full segment (or no request).
    """
    _check_trace(trace)
    ms = _check_lengths(segment_lengths)
    return {m: _best_f1(*stats) for m, stats in _srp_statistics(trace, ms).items()}


def model_segment_routing_best_performance(trace: RoutingTrace,
                                           segment_lengths=DEFAULT_SEGMENT_LENGTHS) -> dict[int, float]:
    """SRP of the whole model: the counts of all layers summed before the best threshold is
    taken (moe-lrc's model-level "mg" table in src/31_srp_refine.py). {m: float}."""
    _check_trace(trace)
    ms = _check_lengths(segment_lengths)
    return {m: float(_best_f1(M.sum(0), P.sum(0), A.sum())) for m, (M, P, A) in _srp_statistics(trace, ms).items()}


# ----------------------------------------------------------------------------- SCH
def segment_cache_best_hit_rate(trace: RoutingTrace, segment_lengths: Sequence[int] = DEFAULT_SEGMENT_LENGTHS,
                                cache_size: int | None = None) -> dict[int, np.ndarray]:
    """Segment cache best hit rate (SCH) of each MoE layer, per segment length m.

    Definition (Liang et al. 2025, arXiv:2505.16056; code: moe-lrc src/41_sch_calc.py
    `calc_fsf`, a Mattson stack simulation of this cache for all sizes at once): each sequence starts with
    an empty cache of `cache_size` experts per layer. At token t the priority of an expert is
    its number of activations in the segment of the m tokens t, t+1, ..., t+m-1 (cut at the end
    of the sequence), less the activations of token t already served; between equal counts
    the less recently used expert goes first. Token t's k experts are looked up against the cache as it was before
    the token (a hit if cached then, or if the cache still had a free slot: filling an empty
    slot is not a miss in moe-lrc); they are then loaded one by one in slot order, each
    evicting the cached expert of lowest priority when the cache is full (which, unlike in
    `jmoe.infer.cachesim`, may be another expert of the same token). The hit rate of a
    sequence is hits / requests; SCH is the mean over sequences, as in moe-lrc (sequences
    with no request at a layer are left out).

    Args:
      trace: the routing trace.
      segment_lengths: the look-ahead segment lengths m (positive integers).
      cache_size: C, cached experts per layer (>= 1); default 2k, about where moe-lrc finds
        most models balance cache effectiveness and size.

    Returns:
      {m: [L] float64} in [0, 1]; NaN for a layer with no request.
    """
    _check_trace(trace)
    ms = _check_lengths(segment_lengths)
    C = 2 * trace.top_k if cache_size is None else _check_positive_int(cache_size, "cache_size")
    rates = _sch(trace, ms, C)
    return {m: rates[i] for i, m in enumerate(ms)}


def _sch(trace: RoutingTrace, ms: tuple[int, ...], C: int) -> np.ndarray:
    """[len(ms), L] SCH; rows of the simulation are (m, layer, sequence), vectorised."""
    seqs = sorted(_sequences(trace), key=len, reverse=True)
    L, k, M = trace.num_layers, trace.top_k, len(ms)
    mmax = max(ms)
    sums = np.zeros((M, L))
    nseq = np.zeros((M, L))
    budget = 1 << 23  # ids per batch: tokens x layers x slots
    i = 0
    while i < len(seqs):
        T = len(seqs[i])
        per_seq = max(1, (T + mmax) * L * k)
        j = i + max(1, min(budget // per_seq, 4096))
        batch = seqs[i:j]
        i = j
        # layer chunks keep one long sequence within the budget
        lchunk = max(1, min(L, budget // max(1, (T + mmax) * k * len(batch))))
        for l0 in range(0, L, lchunk):
            ls = range(l0, min(L, l0 + lchunk))
            hits, reqs = _sch_batch(trace, batch, ls, ms, C)
            # hits, reqs: [M, len(ls), B]
            ok = reqs > 0
            rate = np.where(ok, hits / np.maximum(reqs, 1), 0.0)
            sums[:, ls.start:ls.stop] += rate.sum(-1)
            nseq[:, ls.start:ls.stop] += ok.sum(-1)
    return np.where(nseq > 0, sums / np.maximum(nseq, 1), np.nan)


def _sch_batch(trace, batch, layers, ms, C):
    """Simulate the SCH cache for sequences `batch` at `layers` and every m. [M, Lb, B] hits and requests.

    Rows r = (m, layer, sequence); per row and expert a priority prio = count * 2**32 + last
    use (the count of the expert in the look-ahead segment, the last use a global counter), and
    mkey = prio where cached, else the maximum, so a victim is one argmin. Flat indices r*E + e.
    """
    E, k, M = trace.num_experts, trace.top_k, len(ms)
    B, Lb = len(batch), len(layers)
    T = len(batch[0])
    mmax = max(ms)
    # ids [Lb * B, T + mmax, k], padded with -1 past each sequence's end
    ids = np.full((Lb, B, T + mmax, k), -1, np.int32)
    for b, g in enumerate(batch):
        ids[:, b, :len(g)] = trace.expert_ids[g][:, layers.start:layers.stop].transpose(1, 0, 2)
    ids = ids.reshape(Lb * B, T + mmax, k)
    base = Lb * B
    R = M * base
    one = np.int64(1) << 32
    top = np.iinfo(np.int64).max
    rowsE = (np.arange(R, dtype=np.int64) * E)[:, None]
    cached = np.zeros(R * E, bool)
    prio = np.zeros(R * E, np.int64)
    mkey = np.full(R * E, top, np.int64)
    mkey2 = mkey.reshape(R, E)
    ncached = np.zeros(R, np.int64)
    hits = np.zeros(R, np.int64)
    reqs = np.tile((ids[:, :T] >= 0).sum((1, 2)), M)
    for mi, m in enumerate(ms):  # counts of the first segment [0, m) of every row
        seg = ids[:, :m].reshape(base, -1)
        flat = (rowsE[mi * base:(mi + 1) * base] + seg)[seg >= 0]
        np.add.at(prio, flat, one)
    ts = 0
    for t in range(T):
        x = np.tile(ids[:, t], (M, 1))  # [R, k]
        valid = x >= 0
        if valid.any():
            idx = rowsE + np.where(valid, x, 0)
            before = cached[idx] & valid  # looked up before the token
            for j in range(k):
                v = valid[:, j]
                ij = idx[:, j]
                free = ncached < C
                hits += v & (before[:, j] | free)
                load = v & ~cached[ij]
                evict = load & ~free
                if evict.any():
                    ev = np.flatnonzero(evict)
                    victim = ev * E + mkey2[ev].argmin(1)
                    cached[victim] = False
                    mkey[victim] = top
                ncached += load & free
                iv = ij[v]
                ts += 1
                p = (prio[iv] // one - 1) * one + ts  # one activation fewer ahead; used now
                prio[iv] = p
                mkey[iv] = p
                cached[iv] = True
        # the token t + m enters each row's look-ahead segment
        nxt = np.concatenate([ids[:, t + m] for m in ms])
        v = nxt >= 0
        if v.any():
            ie = (rowsE + nxt)[v]
            prio[ie] += one
            mkey[ie] = np.where(cached[ie], prio[ie], top)
    return hits.reshape(M, Lb, B), reqs.reshape(M, Lb, B)


# ----------------------------------------------------------------------------- popularity & reuse
def popularity(trace: RoutingTrace) -> np.ndarray:
    """[L, E] share of each layer's requests (used slots) that went to each expert; rows sum
    to 1 (0 for a layer with no request)."""
    _check_trace(trace)
    L, E = trace.num_layers, trace.num_experts
    ids = trace.expert_ids
    layer = np.broadcast_to(np.arange(L)[None, :, None], ids.shape)
    v = ids >= 0
    counts = np.bincount((layer[v] * E + ids[v]).astype(np.int64), minlength=L * E).reshape(L, E)
    total = counts.sum(1, keepdims=True)
    return counts / np.maximum(total, 1)


def _reuse_distances(ids: np.ndarray, num_experts: int, kind: str) -> np.ndarray:
    """Reuse distances of the re-requests of one layer (ids [T, k]); first requests left out."""
    T = ids.shape[0]
    active = _counts(ids, num_experts) > 0
    steps = np.arange(T, dtype=np.int32)[:, None]
    lastpos = np.maximum.accumulate(np.where(active, steps, -1), axis=0)  # last request at or before t
    out = []
    for s in range(0, T, _CHUNK):
        e = min(T, s + _CHUNK)
        x = ids[s:e]
        prev = lastpos[s - 1:e - 1] if s > 0 else np.vstack([np.full((1, num_experts), -1, np.int32), lastpos[:e - 1]])
        xc = np.where(x >= 0, x, 0)
        tp = np.take_along_axis(prev, xc, axis=1)  # [b, k] previous request of each slot's expert
        keep = (x >= 0) & (tp >= 0)
        if kind == "distinct":
            d = (prev[:, None, :] > tp[:, :, None]).sum(-1)
        else:
            d = np.arange(s, e)[:, None] - tp
        out.append(d[keep])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def reuse_distance_histogram(trace: RoutingTrace, bins: int = 32, kind: str = "distinct") -> np.ndarray:
    """[L, bins] int64 histogram of the reuse distances of each layer's requests.

    Reuse distance (Mattson et al. 1970, "Evaluation techniques for storage hierarchies":
    the LRU stack distance; Ding & Zhong 2003, "Predicting whole-program locality through
    reuse distance analysis"), per MoE layer with tokens as steps: for a request of expert e
    by token t whose previous request of e at that layer was by token t' < t,

      kind="distinct": the number of distinct experts other than e requested at the layer by
        tokens t'+1 .. t-1 (0: e was needed again before any other expert). With k = 1 a
        request hits an LRU cache of N experts exactly when this is < N.
      kind="steps": t - t', the tokens since the previous request (1: consecutive tokens).

    Tokens are taken in processing order over the whole trace, across sequences, as a cache
    sees them. First requests of an expert have no reuse distance and are not counted (there
    are as many as the layer has distinct experts). Bin i counts distance i; the last bin
    counts every distance >= bins - 1.
    """
    _check_trace(trace)
    bins = _check_positive_int(bins, "bins")
    if kind not in ("distinct", "steps"):
        raise ValueError(f"kind must be 'distinct' or 'steps', got {kind!r}")
    out = np.zeros((trace.num_layers, bins), np.int64)
    for l in range(trace.num_layers):
        d = _reuse_distances(trace.expert_ids[:, l, :], trace.num_experts, kind)
        out[l] = np.bincount(np.minimum(d, bins - 1), minlength=bins)
    return out


def pair_counts(trace: RoutingTrace, lookahead: int = 1) -> np.ndarray:
    """[L - lookahead, E, E] token counts: pairs[l, i, j] = tokens using expert i at MoE layer l
    and expert j at MoE layer l + lookahead (every pair of their k x k choices)."""
    _check_trace(trace)
    L, E = trace.num_layers, trace.num_experts
    if not isinstance(lookahead, (int, np.integer)) or isinstance(lookahead, bool) or not 1 <= lookahead < L:
        raise ValueError(f"lookahead must be an integer in [1, {L - 1}] for a trace of {L} MoE layers, "
                         f"got {lookahead!r}")
    out = np.zeros((L - lookahead, E, E))
    ids = trace.expert_ids.astype(np.int64)
    for l in range(L - lookahead):
        a, b = ids[:, l, :, None], ids[:, l + lookahead, None, :]
        v = (a >= 0) & (b >= 0)
        out[l] = np.bincount(np.broadcast_to(a * E + b, v.shape)[v], minlength=E * E).reshape(E, E)
    return out


def coactivation(trace: RoutingTrace, lookahead: int = 1) -> np.ndarray:
    """[L - lookahead, E, E] P(expert j at MoE layer l + lookahead | expert i at MoE layer l),
    over the tokens of the trace: (tokens using i at l and j at l + lookahead) / (tokens using
    i at l). Rows of experts never used at l are 0. With k slots each row sums to the mean
    number of experts at layer l + lookahead (k when no slot is unused)."""
    pairs = pair_counts(trace, lookahead)
    ids = trace.expert_ids.astype(np.int64)
    E = trace.num_experts
    for l in range(len(pairs)):
        pairs[l] /= np.maximum(np.bincount(ids[:, l][ids[:, l] >= 0], minlength=E), 1)[:, None]
    return pairs


# ----------------------------------------------------------------------------- report
def _finite_or_none(x):
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    x = float(x)
    return x if math.isfinite(x) else None


def report(trace: RoutingTrace, segment_lengths=DEFAULT_SEGMENT_LENGTHS, cache_size: int | None = None,
           reuse_bins: int = 32, lookahead: int = 1) -> dict:
    """Every locality metric of `trace` as one JSON-serialisable dict (NaN written as null).

    Keys: format, version, trace (sizes), popularity `[L][E]`, srp (per_layer `{m: [L]}`, model
    `{m: x}`), sch (cache_size C, default 2k as moe-lrc finds a good trade-off; per_layer
    `{m: [L]}`, mean `{m: x}` over layers), reuse_distance (histogram `[L][bins]` of kind
    "distinct", first_requests [L]), coactivation (lookahead, top1 [L - lookahead]: for each
    layer, the share of tokens whose next-layer experts include the most likely successor of
    their own expert, averaged over their slots; absent with a single MoE layer).
    Segment-length keys are strings (JSON object keys).
    """
    _check_trace(trace)
    ms = _check_lengths(segment_lengths)
    C = 2 * trace.top_k if cache_size is None else _check_positive_int(cache_size, "cache_size")
    bins = _check_positive_int(reuse_bins, "reuse_bins")
    lookahead = _check_positive_int(lookahead, "lookahead")
    k, L = trace.top_k, trace.num_layers
    req = (trace.expert_ids >= 0).sum((0, 2))
    srp = segment_routing_best_performance(trace, ms)
    srp_model = model_segment_routing_best_performance(trace, ms)
    sch = segment_cache_best_hit_rate(trace, ms, C)
    weights = req / max(int(req.sum()), 1)
    out = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "trace": {"num_tokens": trace.num_tokens, "num_layers": L, "top_k": k, "num_experts": trace.num_experts,
                  "num_sequences": trace.num_sequences, "layers": trace.layer_ids().tolist(),
                  "requests_per_layer": req.tolist()},
        "popularity": popularity(trace).tolist(),
        "srp": {"segment_lengths": list(ms), "per_layer": {str(m): _finite_or_none(srp[m].tolist()) for m in ms},
                "model": {str(m): _finite_or_none(srp_model[m]) for m in ms}},
        "sch": {"cache_size": C, "segment_lengths": list(ms),
                "per_layer": {str(m): _finite_or_none(sch[m].tolist()) for m in ms},
                "mean": {str(m): _finite_or_none(np.nansum(sch[m] * weights) if np.isfinite(sch[m]).any() else np.nan)
                         for m in ms}},
        "reuse_distance": {"kind": "distinct", "bins": bins,
                           "histogram": reuse_distance_histogram(trace, bins).tolist(),
                           "first_requests": [int(np.unique(trace.expert_ids[:, l][trace.expert_ids[:, l] >= 0]).size)
                                              for l in range(L)]},
    }
    if L > lookahead:
        out["coactivation"] = {"lookahead": lookahead, "top1": _successor_hit(trace, lookahead)}
    return out


def _successor_hit(trace: RoutingTrace, lookahead: int) -> list:
    """Per layer pair: mean over used slots at l of [argmax_j P(j | i) is used at l + lookahead]."""
    P = coactivation(trace, lookahead)
    out = []
    for l in range(P.shape[0]):
        a = trace.expert_ids[:, l]
        b = trace.expert_ids[:, l + lookahead]
        succ = P[l].argmax(1)  # [E]
        pred = np.where(a >= 0, succ[np.where(a >= 0, a, 0)], -2)  # [N, k]
        hit = (pred[:, :, None] == b[:, None, :]).any(-1)
        n = int((a >= 0).sum())
        out.append(_finite_or_none(hit[a >= 0].sum() / n if n else np.nan))
    return out


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_report(rep: dict, path) -> Path:
    """Write `rep` as JSON to `path` atomically. Returns the path."""
    path = Path(path)
    _atomic_write(path, lambda f: f.write((json.dumps(rep, indent=1, allow_nan=False) + "\n").encode()))
    return path


def plot_report(rep: dict, path) -> Path:
    """Draw a `report` as one PNG figure at `path` (written atomically): expert popularity
    per layer (heatmap), SRP and SCH against the segment length (one thin line per layer, the
    model / mean in bold), and the reuse-distance histograms (share per layer, heatmap).
    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(13, 9), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots(2, 2)
    info = rep["trace"]
    fig.suptitle(f"routing locality: {info['num_tokens']} tokens, {info['num_layers']} MoE layers, "
                 f"{info['num_experts']} experts, top-{info['top_k']}")

    pop = np.asarray(rep["popularity"], float)
    im = ax[0, 0].imshow(pop, aspect="auto", interpolation="nearest", cmap="viridis")
    ax[0, 0].set(title="expert popularity (share of the layer's requests)", xlabel="expert", ylabel="MoE layer")
    fig.colorbar(im, ax=ax[0, 0])

    for a, key, agg, title in ((ax[0, 1], "srp", "model", "segment routing best performance (SRP)"),
                               (ax[1, 0], "sch", "mean", f"segment cache best hit rate (SCH), "
                                                          f"cache {rep['sch']['cache_size']} experts")):
        ms = rep[key]["segment_lengths"]
        per = np.array([[np.nan if v is None else v for v in rep[key]["per_layer"][str(m)]] for m in ms]).T
        for row in per:
            a.plot(ms, row, color="tab:blue", alpha=0.25, linewidth=0.8)
        a.plot(ms, [np.nan if rep[key][agg][str(m)] is None else rep[key][agg][str(m)] for m in ms],
               color="tab:red", linewidth=2.2, marker="o", label=f"{agg} (thin: layers)")
        a.set_xscale("log", base=2)
        a.set(title=title, xlabel="segment length m (tokens)", ylim=(0, 1.02))
        a.legend(loc="lower right")
        a.grid(alpha=0.3)

    h = np.asarray(rep["reuse_distance"]["histogram"], float)
    share = h / np.maximum(h.sum(1, keepdims=True), 1)
    im = ax[1, 1].imshow(share, aspect="auto", interpolation="nearest", cmap="magma")
    ax[1, 1].set(title=f"reuse distance (distinct other experts between requests; last bin: "
                       f">= {rep['reuse_distance']['bins'] - 1})", xlabel="reuse distance", ylabel="MoE layer")
    fig.colorbar(im, ax=ax[1, 1])
    layers = rep["trace"].get("layers") or list(range(info["num_layers"]))
    step = max(1, len(layers) // 16)
    for a in (ax[0, 0], ax[1, 1]):  # one tick per MoE layer (thinned), labelled with its model layer
        a.set_yticks(range(0, len(layers), step), [str(layer) for layer in layers[::step]])
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return path
