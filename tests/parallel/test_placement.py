"""Expert placement: the placement data, EPLB against DeepSeek's reference example, ExFlow and
MoETuner against brute force on small cases, the measures, and `jmoe place`."""

import itertools
import json

import numpy as np
import pytest

from jmoe.cli import main
from jmoe.infer.trace import trace_from_routings
from jmoe.parallel.placement import (
    PLACEMENTS,
    ExpertPlacement,
    PlacementStats,
    device_load,
    excess_load,
    measures,
    place,
    traffic,
)
from jmoe.parallel.placement.eplb import balanced_packing, hierarchical, replicate
from jmoe.parallel.placement.exflow import affinity_devices, assign, kept
from jmoe.parallel.placement.moetuner import balanced_clusters

# deepseek-ai/EPLB's README example: 2 layers, 12 experts, 16 slots, 4 groups, 2 nodes, 8 GPUs
EPLB_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]], float)
EPLB_HIERARCHICAL = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                     [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def zipf_trace(num_experts=16, layers=3, tokens=2000, k=2, affinity=0.0, seed=0):
    """Tokens routed with Zipf popularity; with probability `affinity` a token's first expert at
    the next layer is a fixed function of its first expert at this one."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_experts + 1)
    p /= p.sum()
    follow = [rng.permutation(num_experts) for _ in range(layers)]
    ids = np.zeros((tokens, layers, k), int)
    for t in range(tokens):
        for l in range(layers):
            chosen = list(rng.choice(num_experts, k, replace=False, p=p))
            if l and rng.random() < affinity:
                nxt = int(follow[l][ids[t, l - 1, 0]])
                chosen = [nxt] + [e for e in chosen if e != nxt][: k - 1]
            ids[t, l] = chosen
    return trace_from_routings([ids[:, l] for l in range(layers)], [np.full((tokens, k), 1.0 / k)] * layers, None,
                               num_experts=num_experts, seq_ids=np.zeros(tokens, int))


@pytest.fixture(scope="module")
def stats():
    return PlacementStats.from_trace(zipf_trace(affinity=0.7))


# ----------------------------------------------------------------------------- EPLB


def test_eplb_equals_deepseeks_example():
    got = [hierarchical(w, 16, 4, 2, 8).tolist() for w in EPLB_WEIGHT]
    assert got == EPLB_HIERARCHICAL
    pl = place(PlacementStats(EPLB_WEIGHT), "eplb", 8, 16, {"num_groups": 4, "num_nodes": 2})
    assert pl.slots.tolist() == EPLB_HIERARCHICAL
    # copies stay on their node: the first 8 slots (node 0) hold the experts of two groups
    for row in pl.slots:
        assert len(set(row[:8].tolist()) & set(row[8:].tolist())) == 0


def test_replicate_minimises_the_largest_load_per_copy():
    rng = np.random.default_rng(1)
    for _ in range(20):
        w = rng.integers(1, 50, 5).astype(float)
        _, _, count = replicate(w, 9)
        best = min(max(w / np.asarray(c)) for c in itertools.product(range(1, 6), repeat=5) if sum(c) == 9)
        assert max(w / count) == pytest.approx(best)


def test_balanced_packing_fills_every_pack_equally_heaviest_first():
    w = np.array([9.0, 1, 8, 2, 7, 3])
    pack, rank = balanced_packing(w, 3)
    assert np.bincount(pack).tolist() == [2, 2, 2]
    assert sorted(np.bincount(pack, weights=w).tolist()) == [10.0, 10.0, 10.0]
    assert sorted(zip(pack.tolist(), rank.tolist())) == sorted({(p, r) for p, r in zip(pack, rank)})


def test_eplb_with_redundant_slots_balances_a_skewed_load(stats):
    rr = place(stats, "round_robin", 8)
    pl = place(stats, "eplb", 8, 24)
    assert pl.slots_per_device == 3 and pl.replicas().sum(1).tolist() == [24] * stats.num_layers
    assert excess_load(pl, stats.load).max() < 0.15 < excess_load(rr, stats.load).min()


# ----------------------------------------------------------------------------- affinity


def test_exflow_places_a_layer_exactly_given_its_neighbour():
    """Each step of the affinity placement is an exact assignment: against every balanced
    placement of layer 1, the one chosen for a fixed layer 0 keeps the most pairs."""
    rng = np.random.default_rng(2)
    for _ in range(5):
        pairs = rng.integers(0, 20, (6, 6)).astype(float)
        first = np.array([0, 0, 0, 1, 1, 1])
        got = assign(pairs.T @ np.eye(2)[first], 3)
        options = [np.array(d) for d in itertools.product(range(2), repeat=6) if sum(d) == 3]
        best = max(kept(pairs, first, b) for b in options)
        assert np.bincount(got).tolist() == [3, 3] and kept(pairs, first, got) == best


def test_exflow_sweeps_never_raise_the_cut():
    rng = np.random.default_rng(5)
    pairs = rng.integers(0, 20, (3, 8, 8)).astype(float)
    cut = lambda dev: sum(pairs[l].sum() - kept(pairs[l], dev[l], dev[l + 1]) for l in range(3))  # noqa: E731
    forward, swept = affinity_devices(pairs, 2, sweeps=0), affinity_devices(pairs, 2, sweeps=8)
    assert cut(swept) <= cut(forward)
    assert all(np.bincount(d).tolist() == [4, 4] for d in swept)


def test_exflow_keeps_a_planted_affinity_on_its_device():
    stats = PlacementStats.from_trace(zipf_trace(num_experts=16, layers=4, k=1, affinity=1.0, seed=3))
    pl = place(stats, "exflow", 4)
    assert traffic(pl, stats.pairs) == pytest.approx(0.0, abs=1e-12)
    assert traffic(place(stats, "round_robin", 4), stats.pairs) > 0.5
    assert (pl.replicas() == 1).all()


def test_moetuner_clusters_as_well_as_brute_force():
    rng = np.random.default_rng(4)
    for _ in range(5):
        load = rng.integers(1, 100, 8).astype(float)
        got = balanced_clusters(load, 2, time_limit=5.0)
        spread = lambda c: np.abs(np.bincount(c, weights=load, minlength=2) - load.sum() / 2).sum()  # noqa: E731
        best = min(spread(np.array(c)) for c in itertools.product(range(2), repeat=8) if sum(c) == 4)
        assert np.bincount(got).tolist() == [4, 4] and spread(got) == pytest.approx(best)


def test_moetuner_balances_and_maps_clusters_to_keep_pairs_together():
    two = PlacementStats.from_trace(zipf_trace(layers=2, affinity=0.7, seed=6))
    pl, rr, greedy = (place(two, m, 4) for m in ("moetuner", "round_robin", "greedy"))
    assert excess_load(pl, two.load).mean() <= excess_load(greedy, two.load).mean() + 1e-9
    assert excess_load(pl, two.load).mean() < excess_load(rr, two.load).mean()
    # its clusters of layer 1 went to the devices that keep the most pairs: no relabelling does better
    device = np.argsort(pl.slots, axis=1) // 4  # [L, E] device of each expert
    for perm in itertools.permutations(range(4)):
        other = ExpertPlacement(slots=np.stack([pl.slots[0], np.argsort(np.asarray(perm)[device[1]], kind="stable")]),
                          num_experts=16, num_devices=4)
        assert traffic(pl, two.pairs) <= traffic(other, two.pairs) + 1e-12


# ----------------------------------------------------------------------------- data and measures


@pytest.mark.parametrize("method", PLACEMENTS.names())
def test_every_method_places_every_expert_evenly(stats, method):
    pl = place(stats, method, 4)
    assert pl.slots.shape == (stats.num_layers, stats.num_experts)
    assert all(sorted(row.tolist()) == list(range(stats.num_experts)) for row in pl.slots)
    assert pl.method == method and pl.layers == stats.layers


def test_measures_by_hand():
    pl = ExpertPlacement(slots=np.array([[0, 1, 2, 0]]), num_experts=3, num_devices=2)  # expert 0 on both devices
    load = np.array([[10.0, 4.0, 2.0]])
    assert device_load(pl, load).tolist() == [[9.0, 7.0]]
    assert excess_load(pl, load).tolist() == [pytest.approx(1.0 / 8.0)]
    two = ExpertPlacement(slots=np.array([[0, 1], [1, 0]]), num_experts=2, num_devices=2)
    pairs = np.array([[[3.0, 1.0], [0.0, 0.0]]])  # 3 tokens 0 -> 0 (split), 1 token 0 -> 1 (kept)
    assert traffic(two, pairs) == pytest.approx(3 / 4)
    m = measures(two, PlacementStats(np.array([[1.0, 1.0], [2.0, 2.0]]), pairs))
    assert m["excess_load"] == 0.0 and m["traffic"] == pytest.approx(0.75)


@pytest.mark.parametrize("slots, n, message", [
    ([[0, 1, 1, 1]], 2, "loses expert 2 of MoE layer 0"),
    ([[0, 1, 2]], 2, "do not split evenly over 2 devices"),
    ([[0, 1, 2, 4]], 2, "expert ids in [0, 3)"),
])
def test_a_bad_placement_is_one_line(slots, n, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        ExpertPlacement(slots=np.array(slots), num_experts=3, num_devices=n)


def test_a_placement_is_checked_against_its_mesh_and_model(tmp_path):
    pl = ExpertPlacement(slots=np.array([[0, 1, 2, 3], [3, 2, 1, 0]]), num_experts=4, num_devices=2, layers=(1, 3))
    back = ExpertPlacement.load(pl.save(tmp_path / "p.json"))
    assert back.slots.tolist() == pl.slots.tolist() and back.layers == (1, 3)
    with pytest.raises(ValueError, match="over 2 devices; the mesh's expert axis has 4"):
        back.check_fits(4)
    with pytest.raises(ValueError, match="for 4 experts per layer; the model has 8"):
        back.check_model(8, (1, 3))
    with pytest.raises(ValueError, match=r"for MoE layers \[1, 3\]; the model's are \[0, 1\]"):
        back.check_model(4, (0, 1))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        ExpertPlacement.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"slots": [[0]]}))
    with pytest.raises(ValueError, match="is not a jmoe placement"):
        ExpertPlacement.load(tmp_path / "other.json")


@pytest.mark.parametrize("method, kw, message", [
    ("nope", {}, "unknown placement method 'nope'"),
    ("eplb", {"num_slots": 12}, "num_slots 12 must be an integer >= the 16 experts"),
    ("eplb", {"num_slots": 18}, "18 slots per layer do not split evenly over 4 devices"),
    ("greedy", {"num_slots": 20}, "places one copy of each expert: num_slots must be 16"),
    ("eplb", {"options": {"num_groups": 0}}, "num_groups"),
    ("eplb", {"options": {"bogus": 1}}, "bogus"),
])
def test_a_bad_request_is_one_line(stats, method, kw, message):
    with pytest.raises(ValueError, match=message):
        place(stats, method, 4, **kw)


def test_affinity_methods_need_pairs(stats):
    with pytest.raises(ValueError, match="needs the inter-layer pairs"):
        place(PlacementStats(stats.load), "exflow", 4)


# ----------------------------------------------------------------------------- jmoe place


def test_jmoe_place_writes_a_placement_better_than_round_robin(tmp_path, capsys):
    trace = zipf_trace(affinity=0.7).save(tmp_path / "t.npz")
    out = tmp_path / "placement.json"
    assert main(["place", "--trace", str(trace), "--mesh", "data=2,expert=4", "--method", "eplb", "--redundant", "4",
                 "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "excess load" in line and "round robin" in line
    d = json.loads(out.read_text())
    pl = ExpertPlacement.load(out)
    assert pl.num_devices == 4 and pl.num_slots == 20 and pl.method == "eplb"
    assert d["measures"]["eplb"]["excess_load"] < d["measures"]["round_robin"]["excess_load"]
    assert main(["place", "--trace", str(trace), "--devices", "4", "--method", "exflow", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["measures"]["exflow"]["traffic"] < d["measures"]["round_robin"]["traffic"]


@pytest.mark.parametrize("args, message", [
    (["--devices", "4", "--method", "greedy", "--redundant", "4"], "places one copy of each expert"),
    (["--devices", "3"], "16 slots per layer do not split evenly over 3 devices"),
    (["--mesh", "data=4"], "has no expert axis"),
    (["--mesh", "expert=x"], "is not an integer"),
    (["--devices", "4", "--option", "num_groups=3"], "eplb: 16 experts in num_groups=3"),
    (["--devices", "4", "--trace", "{tmp}/missing.npz"], "missing.npz does not exist"),
])
def test_jmoe_place_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    trace = zipf_trace(tokens=200).save(tmp_path / "t.npz")
    argv = ["place", "--trace", str(trace), "--out", str(tmp_path / "p.json"), *[a.format(tmp=tmp_path) for a in args]]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ----------------------------------------------------------------------------- jmoe train


@pytest.mark.parametrize("args, message", [
    (["--rebalance-every", "2"], "--rebalance-every needs a mesh with an expert axis of 2 or more devices"),
    (["--mesh", "data=2", "--placement", "{tmp}/p.json"], "--placement needs a mesh with an expert axis"),
    (["--mesh", "expert=4", "--redundant-experts", "4"], "--redundant-experts needs --rebalance-every"),
    (["--mesh", "expert=4", "--rebalance-every", "2", "--rebalance-method", "nope"], "unknown placement method 'nope'"),
    (["--mesh", "expert=4", "--rebalance-every", "2", "--rebalance-method", "greedy", "--redundant-experts", "4"],
     "places one copy of each expert"),
    (["--mesh", "expert=4", "--rebalance-every", "2", "--redundant-experts", "3"], "do not split evenly"),
    (["--mesh", "expert=4", "--placement", "{tmp}/missing.json"], "--placement: placement file"),
    (["--mesh", "expert=2", "--placement", "{tmp}/p.json"], "the placement is over 4 devices; the mesh's expert axis has 2"),
    (["--mesh", "expert=4", "--placement", "{tmp}/p8.json"], "for 8 experts per layer; the model has 4"),
    (["--mesh", "data=4", "--fssdp-experts", "2"], "fssdp_experts=2 needs ep_impl='fssdp'"),
])
def test_jmoe_train_refuses_a_placement_it_cannot_run(tmp_path, capsys, args, message):
    from tests.train.conftest import MICRO

    ExpertPlacement(slots=np.tile(np.arange(4), (2, 1)), num_experts=4, num_devices=4, layers=(0, 1)).save(tmp_path / "p.json")
    ExpertPlacement(slots=np.tile(np.arange(8), (2, 1)), num_experts=8, num_devices=4).save(tmp_path / "p8.json")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["train", "--out", str(tmp_path / "run"), "--steps", "2", "--quiet", *MICRO,
            *[a.format(tmp=tmp_path) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
