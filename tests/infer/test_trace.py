"""Routing trace files: round trip, atomic writes, every bad file as one ValueError naming the
file, field validation, concatenation and building a trace from per-layer routings."""

import re
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.infer.trace import FORMAT, VERSION, RoutingTrace, concat, load, trace_from_routings


def make_trace(n=6, layers=None):
    ids = np.array([[[0, 1], [2, -1]],
                    [[1, 3], [0, 2]],
                    [[2, 0], [1, -1]],
                    [[3, 1], [3, 0]],
                    [[0, 2], [-1, -1]],
                    [[1, 0], [2, 3]]], np.int32)[:n]
    w = np.where(ids >= 0, 0.5, 0.0).astype(np.float32)
    return RoutingTrace(ids, w, 4, np.array([0, 0, 1, 0, 1, 1], np.int32)[:n], layers)


def test_round_trip(tmp_path):
    t = make_trace(layers=np.array([1, 3]))
    path = t.save(tmp_path / "run.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.npz"]  # no temporary file left
    u = load(path)
    assert (u.num_tokens, u.num_layers, u.top_k, u.num_experts, u.num_sequences) == (6, 2, 2, 4, 2)
    np.testing.assert_array_equal(u.expert_ids, t.expert_ids)
    np.testing.assert_array_equal(u.weights, t.weights)
    np.testing.assert_array_equal(u.seq_ids, t.seq_ids)
    np.testing.assert_array_equal(u.layers, [1, 3])
    assert u.expert_ids.dtype == np.int32 and u.weights.dtype == np.float32 and u.seq_ids.dtype == np.int32
    with np.load(path) as z:
        assert str(z["format"]) == FORMAT and int(z["version"]) == VERSION
    # no layers; a name without .npz is kept as given; saving over a file replaces it
    v = make_trace()
    v.save(tmp_path / "plain")
    v.save(tmp_path / "plain")
    assert RoutingTrace.load(tmp_path / "plain").layers is None
    np.testing.assert_array_equal(v.layer_ids(), [0, 1])


def test_construction_converts_dtypes():
    ids = np.array([[[0, 1]]], np.int64)
    t = RoutingTrace(ids, np.ones((1, 1, 2)), 2, np.array([0]))
    assert t.expert_ids.dtype == np.int32 and t.weights.dtype == np.float32 and t.seq_ids.dtype == np.int32


def _write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _fields(t):
    return dict(format=np.array(FORMAT), version=np.array(VERSION), expert_ids=t.expert_ids, weights=t.weights,
                num_experts=np.array(t.num_experts), seq_ids=t.seq_ids)


def test_bad_files(tmp_path):
    t = make_trace()
    cases = {
        "missing.npz": ("does not exist", None),
        "text.npz": ("is not an .npz archive", lambda p: p.write_text("hello")),
        "npy.npz": ("is not an .npz archive", lambda p: np.save(open(p, "wb"), np.zeros(3))),
        "other_zip.npz": ("is not a 'jmoe-routing-trace' file",
                          lambda p: zipfile.ZipFile(p, "w").writestr("notes.txt", "x")),
        "format.npz": ("is not a 'jmoe-routing-trace' file (format: 'other')",
                       lambda p: _write_npz(p, **{**_fields(t), "format": np.array("other")})),
        "noformat.npz": ("(format: none)", lambda p: _write_npz(p, **{k: v for k, v in _fields(t).items() if k != "format"})),
        "version.npz": ("has version 2; this jmoe reads version 1",
                        lambda p: _write_npz(p, **{**_fields(t), "version": np.array(2)})),
        "noweights.npz": ("lacks the field 'weights'",
                          lambda p: _write_npz(p, **{k: v for k, v in _fields(t).items() if k != "weights"})),
        "shape.npz": ("weights must have the shape of expert_ids",
                      lambda p: _write_npz(p, **{**_fields(t), "weights": t.weights[:, :1]})),
        "seq.npz": ("seq_ids must be a [N] array", lambda p: _write_npz(p, **{**_fields(t), "seq_ids": t.seq_ids[:3]})),
        "experts.npz": ("num_experts must be an integer scalar",
                        lambda p: _write_npz(p, **{**_fields(t), "num_experts": np.array([4, 4])})),
        "range.npz": ("expert_ids must lie in [-1, 3)", lambda p: _write_npz(p, **{**_fields(t), "num_experts": np.array(3)})),
        "pickled.npz": ("cannot be read", lambda p: _write_npz(p, **{**_fields(t), "seq_ids": np.array([None] * 6, object)})),
        "truncated.npz": ("", None),
    }
    good = t.save(tmp_path / "good.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(good[: len(good) // 2])
    for name, (msg, make) in cases.items():
        p = tmp_path / name
        if make is not None:
            make(p)
        with pytest.raises(ValueError) as e:
            load(p)
        text = str(e.value)
        assert str(p) in text and msg in text and "\n" not in text, (name, text)


def test_validate_names_the_field():
    ids = np.array([[[0, 1]], [[1, -1]]], np.int32)
    w = np.array([[[0.5, 0.5]], [[1.0, 0.0]]], np.float32)
    s = np.array([0, 0], np.int32)
    ok = dict(expert_ids=ids, weights=w, num_experts=2, seq_ids=s)
    bad = [
        (dict(num_experts=0), "num_experts must be a positive integer"),
        (dict(num_experts=True), "num_experts must be a positive integer"),
        (dict(expert_ids=ids[:, 0]), "expert_ids must be a non-empty [N, L, k] array"),
        (dict(expert_ids=ids.astype(np.float32)), "expert_ids must hold integers"),
        (dict(expert_ids=ids - 1), "expert_ids must lie in [-1, 2)"),
        (dict(expert_ids=np.array([[[1, 1]], [[1, -1]]], np.int32)), "expert_ids repeats an expert"),
        (dict(weights=w[..., :1]), "weights must have the shape of expert_ids"),
        (dict(weights=w.astype(np.int32)), "weights must hold floats"),
        (dict(weights=np.where(ids >= 0, np.nan, 0).astype(np.float32)), "weights must be finite"),
        (dict(weights=np.ones_like(w)), "weights must be 0 at unused slots"),
        (dict(seq_ids=s[:1]), "seq_ids must be a [N] array with N = 2"),
        (dict(seq_ids=s - 1), "seq_ids must lie in [0, 2**31)"),
        (dict(layers=np.array([0, 1])), "layers must be a [L] array with L = 1"),
        (dict(layers=np.array([-1])), "layers must be non-negative, strictly increasing"),
    ]
    for change, msg in bad:
        with pytest.raises(ValueError, match=re.escape(msg)):
            RoutingTrace(**{**ok, **change})
    with pytest.raises(ValueError, match="layers must be non-negative, strictly increasing"):
        RoutingTrace(np.zeros((1, 2, 1), np.int32), np.zeros((1, 2, 1), np.float32), 1, np.zeros(1, np.int32),
                     np.array([2, 2]))


def test_concat():
    a = make_trace(3)
    b = RoutingTrace(np.array([[[1], [0]]], np.int32), np.ones((1, 2, 1), np.float32), 4, np.array([0], np.int32))
    c = RoutingTrace.concat([a, b])
    assert (c.num_tokens, c.top_k) == (4, 2)
    np.testing.assert_array_equal(c.expert_ids[3], [[1, -1], [0, -1]])
    np.testing.assert_array_equal(c.weights[3], [[1, 0], [1, 0]])
    np.testing.assert_array_equal(c.seq_ids, [0, 0, 1, 2])  # b's sequence 0 stays apart from a's
    np.testing.assert_array_equal(concat([a, b], keep_seq_ids=True).seq_ids, [0, 0, 1, 0])
    with pytest.raises(ValueError, match="traces must be a non-empty list"):
        concat([])
    with pytest.raises(ValueError, match=r"traces\[1\] has 5 experts"):
        concat([a, RoutingTrace(b.expert_ids, b.weights, 5, b.seq_ids)])
    with pytest.raises(ValueError, match=r"traces\[1\] records other model layers"):
        concat([a, RoutingTrace(b.expert_ids, b.weights, 4, b.seq_ids, np.array([0, 2]))])
    with pytest.raises(ValueError, match=r"traces\[1\] must be a RoutingTrace"):
        concat([a, "b"])


def test_trace_from_routings():
    ids0 = jnp.array([[0, 1], [2, 5]])  # 5 >= E: a FLOP-free expert, not recorded
    w0 = jnp.array([[0.6, 0.4], [0.7, 0.3]])
    ids1 = np.array([[3, 1, 0], [1, 2, 3]])
    w1 = np.full((2, 3), 0.25)
    m1 = np.array([[True, False, True], [True, True, False]])
    t = trace_from_routings([ids0, ids1], [w0, w1], [None, m1], num_experts=4, seq_ids=[7, 7], layers=[0, 2])
    assert (t.num_tokens, t.num_layers, t.top_k) == (2, 2, 3)
    np.testing.assert_array_equal(t.expert_ids, [[[0, 1, -1], [3, -1, 0]], [[2, -1, -1], [1, 2, -1]]])
    np.testing.assert_allclose(t.weights, [[[0.6, 0.4, 0], [0.25, 0, 0.25]], [[0.7, 0, 0], [0.25, 0.25, 0]]])
    np.testing.assert_array_equal(t.layers, [0, 2])
    with pytest.raises(ValueError, match="weights_per_layer has 1 arrays for 2 layers"):
        trace_from_routings([ids0, ids1], [w0], None, 4, [0, 0])
    with pytest.raises(ValueError, match=r"expert_ids_per_layer\[1\] must be an integer \[T, k\] array with T = 2"):
        trace_from_routings([ids0, ids1[:1]], [w0, w1[:1]], None, 4, [0, 0])
    with pytest.raises(ValueError, match=r"masks_per_layer\[1\] must have shape"):
        trace_from_routings([ids0, ids1], [w0, w1], [None, m1[:, :2]], 4, [0, 0])
    with pytest.raises(ValueError, match="seq_ids must be a \\[T\\] array with T = 2"):
        trace_from_routings([ids0], [w0], None, 4, [0, 0, 0])
    with pytest.raises(ValueError, match="expert_ids_per_layer must hold one"):
        trace_from_routings([], [], None, 4, [])
