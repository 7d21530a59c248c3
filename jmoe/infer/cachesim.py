"""Expert cache simulation: how often the experts a token needs are already on the device.

Semantics of `simulate` (every policy, with or without prefetch):

- Each MoE layer has its own cache of N expert slots; layers do not share slots. Caches start
  empty and persist across the sequences of the trace (tokens in processing order).
- A step is one token at one layer: its k experts (slots holding -1 are not requests) are
  needed at once, so N >= k is required and no expert of a step is evicted to make room for
  another expert of the same step.
- A request is a hit when its expert is cached at the start of the step. Missed experts are
  loaded, in ascending expert id, each evicting the policy's victim when the cache is full.
- hit rate = hits / requests, per layer and over all tokens and layers.
- Prefetch: an optional `prefetch(layer, t) -> expert ids` is called before each step (layer
  is the MoE layer's index in the trace, t the token's index); the experts it names that are
  not cached are loaded first (in ascending id; at most N per step; they may evict any cached
  expert but each other). Such loads are counted apart (`prefetch_loads`), and those whose
  expert is requested before it is evicted are `useful_prefetches`. Calls come layer by
  layer (all tokens of layer 0, then layer 1, ...): a predictor should derive its answer from
  (layer, t) and the trace, not from the order of the calls.

Policies are entries of `CACHE_POLICIES` (one small class each; ties always go to the lowest
expert id): lru, lfu, score (HybriMoE), arc (Megiddo & Modha) and belady (the offline optimum,
an upper bound for every policy above). A new policy is one `CachePolicy` subclass and one
`CACHE_POLICIES.add` line.

>>> import numpy as np
>>> from jmoe.infer.trace import RoutingTrace
>>> ids = np.array([[[0]], [[1]], [[0]], [[2]], [[0]]], np.int32)        # [N=5, L=1, k=1]
>>> t = RoutingTrace(ids, np.ones(ids.shape, np.float32), 3, np.zeros(5, np.int32))
>>> simulate(t, 2, "lru").hits.tolist()
[2]
"""

from __future__ import annotations

import dataclasses
import abc
import heapq
import math
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np

from jmoe.infer.trace import RoutingTrace
from jmoe.options import NoOptions, Options, option
from jmoe.registry import Registry

CACHE_POLICIES: Registry = Registry("cache policy")

Prefetch = Callable[[int, int], Sequence[int]]


class CachePolicy(abc.ABC):
    """A replacement policy for one layer's cache. The simulator keeps the set of cached
    experts and tells the policy what happens; the policy only picks victims.

    Calls, for each layer: `reset` once, then per step t (token index): `observe` (when the
    class defines it) with the step's experts, then in ascending expert id `hit` for each
    cached one, and for each missing one `evict` (only when the cache is full) then `load`.
    Prefetched experts come in through `evict(..., prefetch=True)` / `load(..., prefetch=True)`
    before the step.
    """

    def __init__(self, options: Options = NoOptions()):
        self.options = options

    def reset(self, num_experts: int, size: int, expert_ids: np.ndarray, weights: np.ndarray) -> None:
        """Start empty. `expert_ids`, `weights`: [T, k] the layer's whole trace (offline
        policies look ahead; online ones must not)."""

    observe: Callable | None = None  # observe(needed: list[int], weights: list[float], t) -> None

    def hit(self, expert: int, t: int) -> None:
        """`expert`, cached, is requested at step t."""

    def load(self, expert: int, t: int, prefetch: bool) -> None:
        """`expert` enters the cache at step t (requested, or prefetched before the step)."""

    @abc.abstractmethod
    def evict(self, incoming: int, protected, t: int, prefetch: bool) -> int:
        """The cache is full and `incoming` must enter: forget and return a cached expert that
        is not in `protected` (the step's experts, or those prefetched with it)."""


# ----------------------------------------------------------------------------- shared pieces
class _LazyHeap:
    """A min-heap of (key, expert) with lazy deletion: an entry counts while `key` equals the
    expert's current key and the expert is cached."""

    def __init__(self, size: int):
        self.heap: list = []
        self.limit = 4 * size + 64

    def push(self, key, expert: int) -> None:
        heapq.heappush(self.heap, (key, expert))

    def pop_min(self, current: dict | list, cached: set, protected) -> int:
        heap, aside = self.heap, []
        while True:
            key, e = heapq.heappop(heap)
            if e not in cached or current[e] != key:
                continue
            if e in protected:
                aside.append((key, e))
                continue
            break
        for item in aside:
            heapq.heappush(heap, item)
        if len(heap) > self.limit:
            self.heap = [(current[x], x) for x in cached if x != e]
            heapq.heapify(self.heap)
        return e


# ----------------------------------------------------------------------------- policies
class LRU(CachePolicy):
    """Least recently used: evict the cached expert whose last request is oldest (experts of
    one step are ordered by id; a prefetched expert counts as used just before its step)."""

    def reset(self, num_experts, size, expert_ids, weights):
        self.order: OrderedDict = OrderedDict()

    def hit(self, expert, t):
        self.order.move_to_end(expert)

    def load(self, expert, t, prefetch):
        self.order[expert] = None

    def evict(self, incoming, protected, t, prefetch):
        for e in self.order:
            if e not in protected:
                break
        del self.order[e]
        return e


class LFU(CachePolicy):
    """Least frequently used: evict the cached expert with the fewest requests so far at the
    layer (counted over the whole trace, also while not cached: "perfect" LFU, as moe-lrc's
    `calc_lfu` in src/50_chr_calc.py); prefetch loads are not requests."""

    def reset(self, num_experts, size, expert_ids, weights):
        self.count = [0] * num_experts
        self.cached: set = set()
        self.heap = _LazyHeap(size)

    def hit(self, expert, t):
        self.count[expert] += 1
        self.heap.push(self.count[expert], expert)

    def load(self, expert, t, prefetch):
        if not prefetch:
            self.count[expert] += 1
        self.cached.add(expert)
        self.heap.push(self.count[expert], expert)

    def evict(self, incoming, protected, t, prefetch):
        e = self.heap.pop_min(self.count, self.cached, protected)
        self.cached.remove(e)
        return e


class Belady(CachePolicy):
    """Belady's MIN (1966), the offline optimum: evict the cached expert whose next request at
    the layer is farthest in the future (never again: infinitely far)."""

    def reset(self, num_experts, size, expert_ids, weights):
        T = expert_ids.shape[0]
        steps = np.broadcast_to(np.arange(T)[:, None], expert_ids.shape)
        v = expert_ids >= 0
        e, s = expert_ids[v], steps[v]
        order = np.lexsort((s, e))
        e, s = e[order], s[order]
        cuts = np.searchsorted(e, np.arange(num_experts + 1))
        self.uses = [s[cuts[i]:cuts[i + 1]].tolist() for i in range(num_experts)]
        self.inf = T + 1
        self.key = [0] * num_experts  # -(next request step)
        self.cached: set = set()
        self.heap = _LazyHeap(size)

    def _set_next(self, expert, t, after: bool):
        u = self.uses[expert]
        i = (bisect_right if after else bisect_left)(u, t)
        self.key[expert] = -(u[i] if i < len(u) else self.inf)
        self.heap.push(self.key[expert], expert)

    def hit(self, expert, t):
        self._set_next(expert, t, after=True)

    def load(self, expert, t, prefetch):
        self.cached.add(expert)
        self._set_next(expert, t, after=not prefetch)

    def evict(self, incoming, protected, t, prefetch):
        e = self.heap.pop_min(self.key, self.cached, protected)
        self.cached.remove(e)
        return e


@dataclasses.dataclass(frozen=True)
class ScoreOptions(Options):
    """Options of the `score` policy."""

    alpha: float = option(0.5, gt=0.0, lt=1.0, doc="weight of the current step's routing weight in the score")


class Score(CachePolicy):
    """HybriMoE's score-based cache (Zhong et al. 2025, "HybriMoE: Hybrid CPU-GPU Scheduling and
    Cache Management for Efficient MoE Inference", arXiv:2504.05897; code:
    github.com/PKU-SEC-Lab/HybriMoE, `KScoreAwareCache` in ktransformers/operators/experts.py,
    updated from the gate in ktransformers/models/modeling_deepseek.py).

    Every expert of a layer has a priority score S, updated when the router runs at each step
    (before the experts are fetched): S <- alpha * s + (1 - alpha) * S for the step's top-p
    experts, with s their routing score, and S <- (1 - alpha) * S for all others. The victim is
    the cached expert of lowest S. HybriMoE uses alpha = 0.5 and p = 2k over the full softmax;
    a trace keeps only the k routing weights of the chosen experts, so here p = k and s is the
    trace's weight. Scores are kept as logarithms relative to the common decay, so long traces
    neither underflow nor reorder.
    """

    def reset(self, num_experts, size, expert_ids, weights):
        if (weights < 0).any():
            raise ValueError("the score cache policy needs non-negative routing weights (scores); "
                             "the trace has negative ones")
        a = self.options.alpha
        self.log_alpha = math.log(a)
        self.log_decay = math.log1p(-a)
        self.key = [-math.inf] * num_experts  # log(S_t / (1 - alpha)^(t + 1)); -inf: score 0
        self.cached: set = set()
        self.heap = _LazyHeap(size)

    def observe(self, needed, weights, t):
        # S_t = alpha w + (1 - alpha) S_{t-1} (others: (1 - alpha) S_{t-1}, key unchanged);
        # with S_t = exp(key_t) (1 - alpha)^(t + 1):
        # key_t = logaddexp(key_{t-1}, log(alpha w) - (t + 1) log(1 - alpha))
        shift = -(t + 1) * self.log_decay
        key = self.key
        for e, w in zip(needed, weights):
            new = self.log_alpha + math.log(w) + shift if w > 0 else -math.inf
            old = key[e]
            key[e] = new if old == -math.inf else max(old, new) + math.log1p(math.exp(-abs(old - new)))
            if e in self.cached:
                self.heap.push(key[e], e)

    def load(self, expert, t, prefetch):
        self.cached.add(expert)
        self.heap.push(self.key[expert], expert)

    def evict(self, incoming, protected, t, prefetch):
        e = self.heap.pop_min(self.key, self.cached, protected)
        self.cached.remove(e)
        return e


class ARC(CachePolicy):
    """Adaptive Replacement Cache (Megiddo & Modha, "ARC: A Self-Tuning, Low Overhead
    Replacement Cache", FAST 2003: the algorithm ARC(c) with c = N), on N fixed slots.

    T1 holds experts requested once since they entered, T2 those requested again, B1/B2 the
    ghosts (ids only) of experts evicted from T1/T2; p is the adaptive target size of T1.
    Cases of a request x: I (x in T1 or T2) -> MRU of T2. II (x in B1): p += max(|B2|/|B1|, 1)
    (at most N), REPLACE, x -> MRU of T2. III (x in B2): p -= max(|B1|/|B2|, 1) (at least 0),
    REPLACE, x -> MRU of T2. IV (new): if |T1| + |B1| = N, drop the LRU ghost of B1 and
    REPLACE, or evict the LRU of T1 when B1 is empty; else, when the directory holds 2N, drop
    the LRU ghost of B2 and REPLACE; x -> MRU of T1. REPLACE evicts the LRU of T1 into B1 when
    |T1| > p (or |T1| = p and x in B2), else the LRU of T2 into B2.
    Adapted to steps: REPLACE takes the least recent expert of its list that is not in the
    step, falling back to the other list. A prefetched expert enters T1 (leaving any ghost
    list, without adapting p) and stays there at its first request: it had not been requested.
    """

    def reset(self, num_experts, size, expert_ids, weights):
        self.c = size
        self.p = 0.0
        self.T1: OrderedDict = OrderedDict()
        self.T2: OrderedDict = OrderedDict()
        self.B1: OrderedDict = OrderedDict()
        self.B2: OrderedDict = OrderedDict()
        self.unrequested: set = set()  # prefetched into T1, not requested since

    def hit(self, expert, t):
        if expert in self.T1:
            del self.T1[expert]
            if expert in self.unrequested:  # its first request: seen once
                self.unrequested.remove(expert)
                self.T1[expert] = None
                return
        else:
            del self.T2[expert]
        self.T2[expert] = None

    def _replace(self, x, protected) -> int:
        T1, T2 = self.T1, self.T2
        from_t1 = len(T1) >= 1 and ((x in self.B2 and len(T1) == self.p) or len(T1) > self.p)
        for T, B in (((T1, self.B1), (T2, self.B2)) if from_t1 else ((T2, self.B2), (T1, self.B1))):
            for e in T:
                if e not in protected:
                    del T[e]
                    B[e] = None
                    self.unrequested.discard(e)
                    return e
        raise AssertionError("no expert outside the step to evict")

    def evict(self, incoming, protected, t, prefetch):
        x, c = incoming, self.c
        B1, B2 = self.B1, self.B2
        if prefetch:
            return self._replace(x, protected)
        if x in B1:
            self.p = min(float(c), self.p + max(len(B2) / len(B1), 1.0))
            return self._replace(x, protected)
        if x in B2:
            self.p = max(0.0, self.p - max(len(B1) / len(B2), 1.0))
            return self._replace(x, protected)
        if len(self.T1) + len(B1) >= c:
            if B1:
                B1.popitem(last=False)
                return self._replace(x, protected)
            for e in self.T1:
                if e not in protected:
                    break
            else:
                return self._replace(x, protected)
            del self.T1[e]
            self.unrequested.discard(e)
            return e
        if len(self.T1) + len(self.T2) + len(B1) + len(B2) >= 2 * c and B2:
            B2.popitem(last=False)
        return self._replace(x, protected)

    def load(self, expert, t, prefetch):
        ghost = self.B1.pop(expert, 0) is None or self.B2.pop(expert, 0) is None
        (self.T2 if ghost and not prefetch else self.T1)[expert] = None
        if prefetch:
            self.unrequested.add(expert)
        c = self.c
        while len(self.T1) + len(self.B1) > c and self.B1:
            self.B1.popitem(last=False)
        while len(self.T1) + len(self.T2) + len(self.B1) + len(self.B2) > 2 * c and (self.B2 or self.B1):
            (self.B2 or self.B1).popitem(last=False)


CACHE_POLICIES.add("lru", LRU)
CACHE_POLICIES.add("lfu", LFU)
CACHE_POLICIES.add("score", Score, options=ScoreOptions)
CACHE_POLICIES.add("arc", ARC)
CACHE_POLICIES.add("belady", Belady)


# ----------------------------------------------------------------------------- simulation
@dataclasses.dataclass(frozen=True)
class SimResult:
    """What a cache of `cache_size` experts per layer did over a trace.

    Arrays are [L] int64, one entry per MoE layer: requests (used slots), hits, loads (demand
    loads = misses), evictions (for demand and prefetch loads), prefetch_loads and
    useful_prefetches (prefetched experts requested before being evicted). Bytes moved are
    (loads + prefetch_loads) times the size of one expert.
    """

    policy: str
    cache_size: int
    requests: np.ndarray
    hits: np.ndarray
    loads: np.ndarray
    evictions: np.ndarray
    prefetch_loads: np.ndarray
    useful_prefetches: np.ndarray

    @property
    def hit_rate(self) -> float:
        """Hits over requests, all layers together (NaN without requests)."""
        n = int(self.requests.sum())
        return int(self.hits.sum()) / n if n else math.nan

    @property
    def hit_rates(self) -> np.ndarray:
        """[L] hit rate of each layer (NaN for a layer without requests)."""
        r = self.requests
        return np.where(r > 0, self.hits / np.maximum(r, 1), np.nan)

    def to_dict(self) -> dict:
        """JSON-serialisable summary (NaN written as None)."""

        def f(x):
            return None if not math.isfinite(x) else float(x)

        return {"policy": self.policy, "cache_size": self.cache_size, "hit_rate": f(self.hit_rate),
                "per_layer": [f(x) for x in self.hit_rates.tolist()], "requests": int(self.requests.sum()),
                "hits": int(self.hits.sum()), "loads": int(self.loads.sum()),
                "evictions": int(self.evictions.sum()), "prefetch_loads": int(self.prefetch_loads.sum()),
                "useful_prefetches": int(self.useful_prefetches.sum())}


def _check(trace, cache_size) -> int:
    if not isinstance(trace, RoutingTrace):
        raise ValueError(f"trace must be a RoutingTrace, got {type(trace).__name__}")
    if not isinstance(cache_size, (int, np.integer)) or isinstance(cache_size, bool) or cache_size < 1:
        raise ValueError(f"cache_size must be a positive integer, got {cache_size!r}")
    if cache_size < trace.top_k:
        raise ValueError(f"cache size {cache_size} is smaller than top-k {trace.top_k}: the experts a token needs "
                         "at one layer must all fit in the cache at once")
    return int(cache_size)


def _resolve(policy: str, options: dict | None):
    cls = CACHE_POLICIES.get(policy)
    opts = CACHE_POLICIES.options(policy).from_dict(dict(options or {}), owner=f"cache policy {policy!r} options")
    return cls, opts


def simulate(trace: RoutingTrace, cache_size: int, policy: str = "lru", prefetch: Prefetch | None = None, *,
             options: dict | None = None) -> SimResult:
    """Replay `trace` through a cache of `cache_size` experts per layer (see the module
    docstring for the exact semantics).

    Args:
      trace: the routing trace, tokens in processing order.
      cache_size: N, expert slots per layer; at least the trace's top-k.
      policy: a name in `CACHE_POLICIES` (lru, lfu, score, arc, belady, ...).
      prefetch: optional `prefetch(layer, t) -> expert ids` to load before each step.
      options: the policy's options as a dict (e.g. {"alpha": 0.3} for score).

    Returns:
      SimResult with per-layer counts.
    """
    N = _check(trace, cache_size)
    cls, opts = _resolve(policy, options)
    if prefetch is not None and not callable(prefetch):
        raise ValueError(f"prefetch must be a callable (layer, t) -> expert ids, got {type(prefetch).__name__}")
    E, L = trace.num_experts, trace.num_layers
    order = np.argsort(trace.expert_ids, axis=2, kind="stable")
    ids = np.take_along_axis(trace.expert_ids, order, axis=2)  # ascending; -1 first
    ws = np.take_along_axis(trace.weights, order, axis=2)
    policies = []
    for l in range(L):
        pol = cls(opts)
        pol.reset(E, N, trace.expert_ids[:, l], trace.weights[:, l])
        policies.append(pol)
    counts = np.zeros((6, L), np.int64)
    for l, pol in enumerate(policies):
        counts[:, l] = _simulate_layer(pol, ids[:, l], ws[:, l], N, E, l, prefetch)
    req, hits, loads, ev, pl, up = counts
    return SimResult(policy=policy, cache_size=N, requests=req, hits=hits, loads=loads, evictions=ev,
                     prefetch_loads=pl, useful_prefetches=up)


def _simulate_layer(pol: CachePolicy, ids: np.ndarray, ws: np.ndarray, N: int, E: int, layer: int,
                    prefetch: Prefetch | None) -> tuple:
    """Counts (requests, hits, loads, evictions, prefetch loads, useful prefetches) of one layer;
    ids [T, k] sorted ascending per row (-1 first), ws the matching weights."""
    has_unused = bool((ids < 0).any())
    rows = ids.tolist()
    wrows = ws.tolist() if pol.observe is not None else None
    observe, hit, load, evict = pol.observe, pol.hit, pol.load, pol.evict
    cached: set = set()
    pending: set = set()  # prefetched, not yet requested
    hits = loads = evictions = pl = useful = requests = 0
    for t, need in enumerate(rows):
        if prefetch is not None:
            got = prefetch(layer, t)
            wanted: list = []
            for e in got:
                if not isinstance(e, (int, np.integer)) or isinstance(e, bool) or not 0 <= e < E:
                    raise ValueError(f"prefetch({layer}, {t}) returned {e!r}; expert ids lie in [0, {E})")
                e = int(e)
                if e not in wanted:
                    wanted.append(e)
            wanted = wanted[:N]
            held = set(wanted)
            for e in sorted(wanted):
                if e in cached:
                    continue
                if len(cached) >= N:
                    v = evict(e, held, t, True)
                    cached.remove(v)
                    pending.discard(v)
                    evictions += 1
                cached.add(e)
                load(e, t, True)
                pending.add(e)
                pl += 1
        if has_unused:
            first = 0
            while first < len(need) and need[first] < 0:
                first += 1
            if first:
                need = need[first:]
                if wrows is not None:
                    wrows[t] = wrows[t][first:]
            if not need:
                continue
        requests += len(need)
        if observe is not None:
            observe(need, wrows[t], t)
        for e in need:
            if e in cached:
                hits += 1
                hit(e, t)
                if pending and e in pending:
                    useful += 1
                    pending.remove(e)
            else:
                if len(cached) >= N:
                    v = evict(e, need, t, False)
                    cached.remove(v)
                    if pending:
                        pending.discard(v)
                    evictions += 1
                cached.add(e)
                load(e, t, False)
                loads += 1
    return requests, hits, loads, evictions, pl, useful


def hit_rate_curve(trace: RoutingTrace, sizes: Sequence[int],
                   policies: Sequence[str] = ("lru", "lfu", "score", "arc", "belady"),
                   prefetch: Prefetch | None = None) -> dict:
    """Overall hit rate of each policy at each cache size: {"sizes": [...], "hit_rate":
    {policy: [one per size]}} (JSON-serialisable). Every size and policy is checked first."""
    sizes = list(sizes)
    if not sizes:
        raise ValueError("sizes must be a non-empty list of cache sizes")
    for s in sizes:
        _check(trace, s)
    policies = list(policies)
    if not policies:
        raise ValueError("policies must name at least one cache policy")
    for p in policies:
        CACHE_POLICIES.get(p)
    out = {p: [] for p in policies}
    for p in policies:
        for s in sizes:
            r = simulate(trace, s, p, prefetch).hit_rate
            out[p].append(None if not math.isfinite(r) else r)
    return {"sizes": [int(s) for s in sizes], "hit_rate": out}


def oracle_prefetch(trace: RoutingTrace) -> Prefetch:
    """A prefetcher that knows the future: the experts token t will use at the layer. With it
    every request hits (the upper bound of any predictor); useful to check a pipeline."""
    ids = trace.expert_ids

    def prefetch(layer: int, t: int) -> list[int]:
        row = ids[t, layer]
        return row[row >= 0].tolist()

    return prefetch
