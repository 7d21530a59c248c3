"""Locality metrics against small examples worked out by hand from their definitions, and the
report / figure."""

import json

import numpy as np
import pytest

from jmoe.infer import locality as lo
from jmoe.infer.trace import RoutingTrace


def trace(seqs_layers, num_experts, seq_ids=None):
    """Trace from ids [N, L, k] given as nested lists."""
    ids = np.array(seqs_layers, np.int32)
    n = ids.shape[0]
    seq = np.zeros(n, np.int32) if seq_ids is None else np.array(seq_ids, np.int32)
    return RoutingTrace(ids, np.where(ids >= 0, 1.0, 0.0).astype(np.float32), num_experts, seq)


def k1(*experts):
    """One layer, k = 1."""
    return [[[e]] for e in experts]


def test_srp_by_hand():
    # experts 0 0 1 0 (E = 3). m = 2: windows [0 0], [0 1], [1 0]; counts per (window, expert):
    # c=0: 4 pairs, c=1: 4, c=2: 1; activations A = 6.
    # s=0: M=6, P=2*9=18 -> 12/24=.5; s=1: M=4+2=6, P=2*5=10 -> 12/16=.75; s=2: M=2, P=2 -> 4/8=.5
    # m = 1: s=1 predicts exactly -> 1. m = 4: one window, counts 3,1,0, A=4:
    # s=1: M=4, P=8 -> 8/12; s=2 and s=3: M=3, P=4 -> 6/8=.75. m = 5: no full window -> NaN.
    t = trace(k1(0, 0, 1, 0), 3)
    srp = lo.segment_routing_best_performance(t, [1, 2, 4, 5])
    np.testing.assert_allclose([srp[1][0], srp[2][0], srp[4][0]], [1.0, 0.75, 0.75])
    assert np.isnan(srp[5][0])
    # a layer with no request at all has no SRP either
    empty = trace([[[0], [-1]], [[1], [-1]]], 2)
    assert np.isnan(lo.segment_routing_best_performance(empty, [1])[1][1])


def test_srp_segments_stay_inside_sequences():
    # sequences [0 0 1 0] and [2 2], interleaved in processing order. m = 2 adds the window
    # [2 2] (counts 0,0,2): c=0: 6, c=1: 4, c=2: 2, A=8. s=1: M=4+4=8, P=2*6=12 -> 16/20=.8;
    # s=2: M=4, P=4 -> 8/12. A window across the sequences ([0 2]) would give 20/26 instead.
    t = trace(k1(0, 2, 0, 2, 1, 0), 3, seq_ids=[0, 1, 0, 1, 0, 0])
    np.testing.assert_allclose(lo.segment_routing_best_performance(t, [2])[2], [0.8])


def test_model_srp_sums_layers_first():
    # layer 0: 0 0 1 0 (above); layer 1: 1 1 1 1 -> windows all count 2 for expert 1 -> SRP 1.
    # model, m = 2: c=0: 4+6=10, c=1: 4, c=2: 1+3=4, A=12; s=1: M=4+8=12, P=2*8=16 -> 24/28;
    # s=2: M=8, P=8 -> 16/20.
    t = trace([[[0], [1]], [[0], [1]], [[1], [1]], [[0], [1]]], 3)
    np.testing.assert_allclose(lo.segment_routing_best_performance(t, [2])[2], [0.75, 1.0])
    assert lo.model_segment_routing_best_performance(t, [2])[2] == pytest.approx(24 / 28)


def test_sch_by_hand():
    # experts 0 1 2 0 1, cache 2, m = 2. t0, t1: free slots (hits, as in moe-lrc). t2: 2 misses;
    # look-ahead counts over tokens 2..3 (less the current): 0 -> 1, 1 -> 0: evict 1. t3: 0 hits.
    # t4: 1 misses. Hits 3/5. With m = 1 the counts are all 0 and recency decides (LRU): t2
    # evicts 0, t3 misses and evicts 1, t4 misses: 2/5.
    t = trace(k1(0, 1, 2, 0, 1), 3)
    sch = lo.segment_cache_best_hit_rate(t, [1, 2], cache_size=2)
    np.testing.assert_allclose([sch[1][0], sch[2][0]], [0.4, 0.6])
    # a second sequence starts with an empty cache; SCH is the mean over sequences:
    # [2 2 2 2] hits 4/4 -> (0.6 + 1) / 2, not (3 + 4) / 9.
    t2 = trace(k1(0, 1, 2, 0, 1, 2, 2, 2, 2), 3, seq_ids=[0] * 5 + [1] * 4)
    np.testing.assert_allclose(lo.segment_cache_best_hit_rate(t2, [2], cache_size=2)[2], [0.8])


def test_sch_ties_and_k2():
    # k = 2, cache 2, m = 2; tokens {0,1} {2,0} {0,1}, slots in that order.
    # t0: both fill free slots (hits). t1: 0 was cached before the token (hit); 2 misses while 0
    # is not served yet: counts over tokens 1..2 are 0 -> 2, 1 -> 1: evict 1. t2: 0 hits; 1
    # misses: 0 and 2 both count 0 now, 2 is the less recently used: evict 2. Hits 4 of 6.
    t = trace([[[0, 1]], [[2, 0]], [[0, 1]]], 3)
    np.testing.assert_allclose(lo.segment_cache_best_hit_rate(t, [2], cache_size=2)[2], [4 / 6])


def test_popularity():
    t = trace([[[0, 1], [2, -1]], [[0, 2], [2, -1]]], 4)
    np.testing.assert_allclose(lo.popularity(t), [[0.5, 0.25, 0.25, 0], [0, 0, 1, 0]])


def test_reuse_distance_by_hand():
    # 0 1 2 0 1 1 0: re-requests at t3 (0; between: 1, 2 -> 2 distinct; 3 steps), t4 (1; 2, 0
    # -> 2; 3), t5 (1; none -> 0; 1), t6 (0; 1 -> 1; 3).
    t = trace(k1(0, 1, 2, 0, 1, 1, 0), 3)
    np.testing.assert_array_equal(lo.reuse_distance_histogram(t, 4), [[1, 1, 2, 0]])
    np.testing.assert_array_equal(lo.reuse_distance_histogram(t, 2), [[1, 3]])  # last bin: >= 1
    np.testing.assert_array_equal(lo.reuse_distance_histogram(t, 4, kind="steps"), [[0, 1, 0, 3]])
    # k = 2: {0,1} {2,3} {0,2}: 0 at t2 saw 2 and 3 in between -> 2; 2 at t2 -> 0.
    t2 = trace([[[0, 1]], [[2, 3]], [[0, 2]]], 4)
    np.testing.assert_array_equal(lo.reuse_distance_histogram(t2, 3), [[1, 0, 1]])
    with pytest.raises(ValueError, match="kind must be"):
        lo.reuse_distance_histogram(t, 4, kind="lru")


def test_reuse_distance_predicts_lru():
    # k = 1: a re-request hits an LRU cache of N experts exactly when its distance is < N
    from jmoe.infer.cachesim import simulate

    rng = np.random.default_rng(3)
    t = trace(k1(*rng.choice(6, size=200, p=[0.4, 0.3, 0.1, 0.1, 0.05, 0.05])), 6)
    h = lo.reuse_distance_histogram(t, 8)[0]
    for n in (1, 2, 4):
        assert simulate(t, n, "lru").hits[0] == h[:n].sum()


def test_coactivation_by_hand():
    # t0: l0 {0}, l1 {1,2}; t1: l0 {0}, l1 {1}; t2: l0 {1}, l1 {0,2}.
    t = trace([[[0, -1], [1, 2]], [[0, -1], [1, -1]], [[1, -1], [0, 2]]], 3)
    np.testing.assert_allclose(lo.coactivation(t)[0], [[0, 1, 0.5], [1, 0, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"lookahead must be an integer in \[1, 1\]"):
        lo.coactivation(t, 2)


def test_bad_arguments():
    t = trace(k1(0, 1), 2)
    with pytest.raises(ValueError, match="segment_lengths must be a non-empty list of positive integers"):
        lo.segment_routing_best_performance(t, [0])
    with pytest.raises(ValueError, match="segment_lengths has repeated values"):
        lo.segment_cache_best_hit_rate(t, [2, 2], 1)
    with pytest.raises(ValueError, match="cache_size must be a positive integer"):
        lo.segment_cache_best_hit_rate(t, [2], 0)
    with pytest.raises(ValueError, match="trace must be a RoutingTrace"):
        lo.popularity(np.zeros((2, 1, 1)))


def test_report_and_plot(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.argsort(rng.random((40, 3, 6)), axis=2)[:, :, :2].astype(np.int32)
    t = RoutingTrace(ids, np.full(ids.shape, 0.5, np.float32), 6, np.repeat([0, 1], 20).astype(np.int32))
    rep = lo.report(t, [2, 4, 64], reuse_bins=8)
    text = json.dumps(rep, allow_nan=False)  # NaN (no window of 64 tokens) is written as null
    assert rep["srp"]["per_layer"]["64"] == [None, None, None] and rep["srp"]["model"]["64"] is None
    assert rep["sch"]["cache_size"] == 4 and len(rep["sch"]["per_layer"]["2"]) == 3
    assert np.array(rep["popularity"]).shape == (3, 6)
    assert np.array(rep["reuse_distance"]["histogram"]).sum() == 3 * 80 - sum(rep["reuse_distance"]["first_requests"])
    assert len(rep["coactivation"]["top1"]) == 2
    assert json.loads(text)["trace"]["num_sequences"] == 2
    png = lo.plot_report(rep, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.png"]
