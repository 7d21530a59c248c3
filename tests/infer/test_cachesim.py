"""Cache simulation: policies against reference strings traced by hand, Belady as the optimum,
prefetch accounting, bad input, and the trace-report / cache-sim commands end to end."""

import functools
import io
import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jmoe.infer.cachesim import CACHE_POLICIES, ARC, hit_rate_curve, oracle_prefetch, simulate
from jmoe.infer.offload_commands import run_cache_sim, run_trace_report
from jmoe.infer.trace import RoutingTrace
from tests.test_bad_input import snapshot, unchanged

# Silberschatz et al., Operating System Concepts: with 3 frames, LRU has 12 faults and OPT 9.
TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def trace_of(steps, num_experts, weights=None):
    """One layer; `steps` a list of expert lists (padded with -1 to the longest)."""
    k = max(len(s) for s in steps)
    ids = np.array([[list(s) + [-1] * (k - len(s))] for s in steps], np.int32)
    w = np.where(ids >= 0, 1.0, 0.0) if weights is None else np.array(weights, np.float64).reshape(ids.shape)
    return RoutingTrace(ids, w.astype(np.float32), num_experts, np.zeros(len(steps), np.int32))


def test_textbook_k1():
    t = trace_of([[e] for e in TEXTBOOK], 8)
    assert simulate(t, 3, "lru").hits.tolist() == [8]
    assert simulate(t, 3, "belady").hits.tolist() == [11]
    # LFU over all requests so far, ties to the lowest id, traced by hand: hits at requests
    # 6 (0), 10 (0), 11 (3), 12 (2), 15 (0), 18 (0).
    r = simulate(t, 3, "lfu")
    assert (r.hits.tolist(), r.loads.tolist(), r.evictions.tolist(), r.requests.tolist()) == ([6], [14], [11], [20])


def test_steps_k2():
    # N = 3; no expert of a step is evicted for another of the same step; ties to the lowest id.
    steps = [[0, 1], [2, 3], [0, 2], [1, 4], [0, 2]]
    t = trace_of(steps, 5)
    # LRU: s1 loads 2 free, 3 evicts 0 (0, 1 tie). s2: 0 evicts 1 (older than 3), 2 hits.
    # s3: 1 evicts 3, 4 evicts 0 (0, 2 tie). s4: 0 evicts 1 (1, 4 tie), 2 hits.
    assert simulate(t, 3, "lru").hits.tolist() == [2]
    # LFU: s1: 3 evicts 0 (counts 1, 1). s2: 0 evicts 1; 2 hits. s3: 1 evicts 3 (count 1);
    # 4 evicts 0 (2 and 0 both at 2). s4: 0 evicts 4 (count 1 < 2), 2 hits.
    assert simulate(t, 3, "lfu").hits.tolist() == [2]
    # Belady: s1: 3 evicts 1 (next use s3, after 0's s2). s2: two hits. s3: 1 evicts 3 (never
    # again), 4 evicts 0 (0 and 2 next at s4: lowest id). s4: 0 evicts 1 (1, 4 never: lowest id).
    r = simulate(t, 3, "belady")
    assert (r.hits.tolist(), r.evictions.tolist()) == ([3], [4])


def test_arc_by_hand():
    # c = 2. Requests 0 0 1 2 1 0 2 0 3 1 0 through ARC(c) of Megiddo & Modha, traced by hand:
    # 0 -> T1; 0 hit -> T2; 1 -> T1; 2: IV.B, REPLACE (|T1|=1 > p=0) 1 -> B1; 1: II, p=1,
    # REPLACE (|T1|=1, not > 1) 0 -> B2, 1 -> T2; 0: III, p=0, REPLACE 2 -> B1, 0 -> T2;
    # 2: II, p=1, REPLACE (T1 empty) 1 -> B2, 2 -> T2; 0 hit; 3: IV.B, REPLACE 2 -> B2, 3 -> T1;
    # 1: III, p=0, REPLACE 3 -> B1, 1 -> T2; 0 hit. Hits at requests 1, 7, 10.
    seq = [0, 0, 1, 2, 1, 0, 2, 0, 3, 1, 0]
    assert simulate(trace_of([[e] for e in seq], 4), 2, "arc").hits.tolist() == [3]
    arc = ARC()
    arc.reset(4, 2, None, None)
    cached = set()
    for t, e in enumerate(seq):
        if e in cached:
            arc.hit(e, t)
            continue
        if len(cached) == 2:
            cached.remove(arc.evict(e, [e], t, False))
        cached.add(e)
        arc.load(e, t, False)
    assert (list(arc.T1), list(arc.T2), list(arc.B1), list(arc.B2), arc.p) == ([], [1, 0], [3], [2], 0.0)


def test_score_policy_by_hand():
    # alpha = 0.5, N = 2: after t2 the scores are 0: 0.125 (1 -> .5 -> .25 -> .125), 1: 0.05
    # (0.2 -> 0.1 -> 0.05), 2: 0.5, so 2 evicts 1 (LRU would evict 0) and 0 hits at t3.
    t = trace_of([[0], [1], [2], [0]], 3, weights=[1.0, 0.2, 1.0, 1.0])
    assert simulate(t, 2, "score").hits.tolist() == [1]
    assert simulate(t, 2, "lru").hits.tolist() == [0]
    # with alpha = 0.9, 0's old weight fades faster: 0: 0.9*0.01 = .009, 1: 0.18*0.1 = .018 -> 0 goes
    assert simulate(t, 2, "score", options={"alpha": 0.9}).hits.tolist() == [0]
    with pytest.raises(ValueError, match="alpha"):
        simulate(t, 2, "score", options={"alpha": 1.5})
    with pytest.raises(ValueError, match="has no option"):
        simulate(t, 2, "lru", options={"alpha": 0.5})


def _optimum(steps, N):
    """Most hits any demand policy can get (exhaustive over eviction choices)."""

    @functools.lru_cache(maxsize=None)
    def best(t, cache):
        if t == len(steps):
            return 0
        need = [e for e in steps[t] if e >= 0]
        hits = sum(e in cache for e in need)
        missing = [e for e in need if e not in cache]
        over = len(cache) + len(missing) - N
        options = [cache] if over <= 0 else [
            cache - frozenset(v) for v in itertools.combinations(sorted(cache - frozenset(need)), over)]
        return hits + max(best(t + 1, c | frozenset(missing)) for c in options)

    return best(0, frozenset())


@st.composite
def small_traces(draw):
    E = draw(st.integers(2, 6))
    k = draw(st.integers(1, min(3, E)))
    n = draw(st.integers(1, 9))
    L = draw(st.integers(1, 2))
    ids = np.full((n, L, k), -1, np.int32)
    for i in range(n):
        for l in range(L):
            used = draw(st.integers(0 if k > 1 else 1, k))
            ids[i, l, :used] = draw(st.permutations(range(E)))[:used]
    w = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=ids.size, max_size=ids.size)), np.float32).reshape(ids.shape)
    t = RoutingTrace(ids, np.where(ids >= 0, w, 0).astype(np.float32), E, np.zeros(n, np.int32))
    return t, draw(st.integers(k, E + 1))


@given(small_traces())
def test_belady_is_the_optimum(case):
    t, N = case
    best = simulate(t, N, "belady")
    for name in CACHE_POLICIES:
        r = simulate(t, N, name)
        assert (r.hits <= best.hits).all(), name
        assert (r.requests == best.requests).all() and (r.hits + r.loads == r.requests).all()
    if t.num_tokens <= 7:
        for l in range(t.num_layers):
            assert best.hits[l] == _optimum([tuple(row) for row in t.expert_ids[:, l].tolist()], N)


def test_prefetch():
    rng = np.random.default_rng(0)
    ids = np.argsort(rng.random((50, 2, 8)), axis=2)[:, :, :3].astype(np.int32)
    ids[::7, 1, 2] = -1
    t = RoutingTrace(ids, np.where(ids >= 0, 0.3, 0).astype(np.float32), 8, np.zeros(50, np.int32))
    for name in CACHE_POLICIES:
        r = simulate(t, 4, name, prefetch=oracle_prefetch(t))
        assert r.hit_rate == 1.0 and r.loads.sum() == 0, name
        assert r.useful_prefetches.sum() == r.prefetch_loads.sum() > 0
    # a prefetcher that is always wrong: every prefetch is wasted and the hit rate drops
    wrong = simulate(t, 3, "lru", prefetch=lambda layer, step: [e for e in range(8) if e not in ids[step, layer]][:3])
    assert wrong.useful_prefetches.sum() == 0 and wrong.hit_rate == 0.0
    with pytest.raises(ValueError, match=r"prefetch\(0, 0\) returned 9; expert ids lie in \[0, 8\)"):
        simulate(t, 3, "lru", prefetch=lambda layer, step: [9])
    with pytest.raises(ValueError, match="prefetch must be a callable"):
        simulate(t, 3, "lru", prefetch=[1, 2])


def test_bad_input_and_results():
    t = trace_of([[0, 1], [1, 2]], 3)
    with pytest.raises(ValueError, match="cache size 1 is smaller than top-k 2: "):
        simulate(t, 1, "lru")
    with pytest.raises(ValueError, match="unknown cache policy 'fifo'; known: arc, belady, lfu, lru, score"):
        simulate(t, 2, "fifo")
    with pytest.raises(ValueError, match="cache_size must be a positive integer"):
        simulate(t, 2.0, "lru")
    r = simulate(t, 2, "lru")
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert (d["hit_rate"], d["per_layer"], d["requests"], d["hits"], d["loads"]) == (0.25, [0.25], 4, 1, 3)
    curve = hit_rate_curve(trace_of([[e] for e in TEXTBOOK], 8), [1, 3, 8], ["lru", "belady"])
    assert curve["sizes"] == [1, 3, 8]
    assert curve["hit_rate"]["lru"][1] == 8 / 20 and curve["hit_rate"]["belady"][1] == 11 / 20
    assert curve["hit_rate"]["belady"][2] == (20 - 6) / 20  # only the 6 first requests miss
    with pytest.raises(ValueError, match="cache size 1 is smaller than top-k 2"):
        hit_rate_curve(t, [2, 1], ["lru"])


@pytest.fixture
def trace_file(tmp_path):
    rng = np.random.default_rng(1)
    ids = np.argsort(rng.random((60, 3, 8)), axis=2)[:, :, :2].astype(np.int32)
    t = RoutingTrace(ids, np.full(ids.shape, 0.5, np.float32), 8, np.repeat([0, 1, 2], 20).astype(np.int32))
    d = tmp_path / "traces"
    d.mkdir()
    return t.save(d / "run.npz")


def test_trace_report_command(tmp_path, trace_file):
    out = io.StringIO()
    args = SimpleNamespace(trace=str(trace_file), out=str(tmp_path / "rep"), segment_lengths=[2, 8], cache_size=None,
                           reuse_bins=16, no_plot=False)
    assert run_trace_report(args, out) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["srp"]["segment_lengths"] == [2, 8] and rep["sch"]["cache_size"] == 4
    assert (tmp_path / "rep" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "report.json" in out.getvalue()
    args.out = str(tmp_path / "named.json")
    run_trace_report(args, io.StringIO())
    assert (tmp_path / "named.json").is_file() and (tmp_path / "named.png").is_file()

    before = snapshot(tmp_path)
    bad = [
        (dict(segment_lengths=[0, 4]), "--segment-lengths must be a positive integer"),
        (dict(segment_lengths=[4, 4]), "--segment-lengths has repeated values"),
        (dict(cache_size=0), "--cache-size must be a positive integer"),
        (dict(reuse_bins=0), "--reuse-bins must be a positive integer"),
        (dict(trace=str(tmp_path / "none.npz"), out=str(tmp_path / "new")), "does not exist"),
        (dict(trace=str(tmp_path / "named.json"), out=str(tmp_path / "new")), "is not an .npz archive"),
        (dict(out=str(tmp_path / "named.png")), "exists and is not a directory"),
        (dict(out=str(tmp_path / "missing" / "r.json")), "does not exist"),
        (dict(out=""), "--out is empty"),
    ]
    for change, msg in bad:
        with pytest.raises(ValueError, match=msg):
            run_trace_report(SimpleNamespace(**{**vars(args), **change}), io.StringIO())
        assert unchanged(before, snapshot(tmp_path)), change


def test_cache_sim_command(tmp_path, trace_file):
    out = io.StringIO()
    args = SimpleNamespace(trace=str(trace_file), cache_size=3, policy="belady", prefetch="none", json=True)
    assert run_cache_sim(args, out) == 0
    res = json.loads(out.getvalue())
    assert {"policy", "cache_size", "hit_rate", "per_layer", "requests", "hits", "loads"} <= set(res)
    assert res["policy"] == "belady" and res["requests"] == 60 * 3 * 2 and len(res["per_layer"]) == 3
    assert res["hit_rate"] == res["hits"] / res["requests"]
    text = io.StringIO()
    run_cache_sim(SimpleNamespace(**{**vars(args), "json": False, "prefetch": "oracle"}), text)
    assert "hit rate 1.0000" in text.getvalue() and "prefetch loads" in text.getvalue()
    before = snapshot(tmp_path)
    for change, msg in [(dict(cache_size=1), "cache size 1 is smaller than top-k 2"),
                        (dict(cache_size=0), "--cache-size must be a positive integer"),
                        (dict(policy="fifo"), "unknown cache policy 'fifo'"),
                        (dict(prefetch="next"), "--prefetch must be none or oracle"),
                        (dict(trace=str(tmp_path / "x.npz")), "does not exist")]:
        with pytest.raises(ValueError, match=msg):
            run_cache_sim(SimpleNamespace(**{**vars(args), **change}), io.StringIO())
    assert unchanged(before, snapshot(tmp_path))
