"""Every Pallas kernel (GPU and TPU families, interpret mode) equals its XLA reference,
forward and gradient; both families lower for their real platforms. On a GPU machine,
`JMOE_PALLAS_COMPILED=1 python -m pytest tests/dispatch/pallas` runs the GPU tests on the
compiled Triton kernels (all pass on an H100)."""

import dataclasses
import json
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jmoe.dispatch import permute, sort_slots, unpermute_combine
from jmoe.dispatch.pallas import (
    DEFAULT_TILINGS,
    TilingTable,
    autotune,
    combine_tokens,
    gmm,
    grouped_ffn,
    permute_tokens,
    tgmm,
    tiling_for,
)
from jmoe.dispatch.pallas import ops
from jmoe.dispatch.pallas.tiling import gpu_launch, tuning_key
from jmoe.experts import ffn
from tests.util import make_routing

# JMOE_PALLAS_COMPILED=1 on a GPU machine runs the same tests on the compiled Triton kernels
COMPILED = os.environ.get("JMOE_PALLAS_COMPILED") == "1"
INTERPRET = not COMPILED
BACKENDS = ["gpu"] if COMPILED else ["gpu", "tpu"]


def group_sizes(pattern, E, M, seed=0):
    rng = np.random.default_rng(seed)
    if pattern == "random_with_zeros":
        cut = np.sort(rng.integers(0, M + 1, size=E - 1))
        sizes = np.diff(np.concatenate([[0], cut, [M]]))
        if E > 2:
            sizes[rng.integers(0, E)] += sizes[0]
            sizes[0] = 0
    elif pattern == "one_group":
        sizes = np.zeros(E, int)
        sizes[E // 2] = M
    elif pattern == "trailing_rows":  # sum < M: masked slots after every group
        sizes = np.full(E, (M - 7) // E)
    return jnp.asarray(sizes, jnp.int32)


def tol(dtype):
    if dtype == jnp.bfloat16:
        return dict(rtol=2e-2, atol=2e-2)
    # compiled float32 dots on GPUs round their inputs to TF32 (10-bit mantissa)
    return dict(rtol=5e-3, atol=3e-2) if COMPILED else dict(rtol=1e-4, atol=1e-4)


def ref_tgmm(lhs, rhs, sizes):
    ends = np.cumsum(sizes)
    starts = ends - sizes
    return np.stack([lhs[s:e].T @ rhs[s:e] for s, e in zip(starts, ends)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E", [1, 8, 64])
@pytest.mark.parametrize("pattern", ["random_with_zeros", "one_group", "trailing_rows"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gmm_forward_and_gradients(backend, E, pattern, dtype):
    M, K, N = 83, 40, 24  # none a multiple of the tiles
    sizes = group_sizes(pattern, E, M)
    k1, k2, k3 = jax.random.split(jax.random.key(E), 3)
    lhs = jax.random.normal(k1, (M, K)).astype(dtype)
    rhs = (jax.random.normal(k2, (E, K, N)) / K**0.5).astype(dtype)
    probe = jax.random.normal(k3, (M, N))

    def loss(f):
        return lambda a, b: jnp.sum(f(a, b).astype(jnp.float32) * probe)

    ours = partial(gmm, group_sizes=sizes, backend=backend, interpret=INTERPRET)
    ref = lambda a, b: lax.ragged_dot(a, b, sizes, preferred_element_type=jnp.float32).astype(dtype)
    out = jax.jit(ours)(lhs, rhs)
    assert out.dtype == dtype and out.shape == (M, N)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref(lhs, rhs), np.float32), **tol(dtype))
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(lhs, rhs)
    g_ref = jax.grad(loss(ref), argnums=(0, 1))(lhs, rhs)
    for a, b in zip(g_ours, g_ref):
        assert a.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gmm_transposed_rhs_and_group_offset(backend):
    M, K, N, E = 61, 32, 40, 6
    sizes = jnp.array([9, 0, 20, 11, 6, 15], jnp.int32)
    lhs = jax.random.normal(jax.random.key(0), (M, K))
    rhs = jax.random.normal(jax.random.key(1), (E, K, N))
    ref = lax.ragged_dot(lhs, rhs, sizes)
    out_t = gmm(lhs, jnp.swapaxes(rhs, 1, 2), sizes, transpose_rhs=True, backend=backend, interpret=INTERPRET)
    np.testing.assert_allclose(out_t, ref, **tol(jnp.float32))
    # a shard holding experts 2..4: their rows match, every other row is zero
    shard = gmm(lhs, rhs[2:5], sizes, group_offset=2, backend=backend, interpret=INTERPRET)
    rows = np.arange(M)
    mine = (rows >= 9) & (rows < 9 + 0 + 20 + 11 + 6)
    np.testing.assert_allclose(np.asarray(shard)[mine], np.asarray(ref)[mine], **tol(jnp.float32))
    assert np.all(np.asarray(shard)[~mine] == 0)
    g = jax.grad(lambda b: jnp.sum(gmm(lhs, b, sizes, group_offset=2, backend=backend, interpret=INTERPRET) ** 2))(rhs[2:5])
    g_ref = jax.grad(lambda b: jnp.sum(jnp.where(mine[:, None], lax.ragged_dot(lhs, jnp.concatenate([rhs[:2], b, rhs[5:]]), sizes), 0) ** 2))(rhs[2:5])
    np.testing.assert_allclose(g, g_ref, **tol(jnp.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E", [1, 8, 64])
def test_tgmm(backend, E):
    M, K, N = 77, 24, 36
    sizes = group_sizes("random_with_zeros", E, M, seed=3)
    lhs = jax.random.normal(jax.random.key(0), (M, K))
    rhs = jax.random.normal(jax.random.key(1), (M, N))
    out = tgmm(lhs, rhs, sizes, backend=backend, interpret=INTERPRET)
    np.testing.assert_allclose(out, ref_tgmm(np.asarray(lhs), np.asarray(rhs), np.asarray(sizes)), **tol(jnp.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_permute_and_combine(backend, dtype):
    T, E, k, d = 29, 8, 3, 40
    r = make_routing(jax.random.key(0), T, E, k, mask_prob=0.2)
    order, _ = sort_slots(r.expert_ids, r.mask, E)
    x = jax.random.normal(jax.random.key(1), (T, d)).astype(dtype)
    ys = jax.random.normal(jax.random.key(2), (T * k, d)).astype(dtype)
    p1 = jax.random.normal(jax.random.key(3), (T * k, d))
    p2 = jax.random.normal(jax.random.key(4), (T, d))
    kw = dict(backend=backend, interpret=INTERPRET)
    np.testing.assert_array_equal(permute_tokens(x, order, k, **kw), permute(x, order, k))
    ga = jax.grad(lambda x: jnp.sum(permute_tokens(x, order, k, **kw).astype(jnp.float32) * p1))(x)
    gb = jax.grad(lambda x: jnp.sum(permute(x, order, k).astype(jnp.float32) * p1))(x)
    np.testing.assert_allclose(np.asarray(ga, np.float32), np.asarray(gb, np.float32), **tol(dtype))
    y = combine_tokens(ys, order, r.weights, **kw)
    np.testing.assert_allclose(y, unpermute_combine(ys, order, r.weights), **tol(dtype))
    ga = jax.grad(lambda ys, w: jnp.sum(combine_tokens(ys, order, w, **kw) * p2), argnums=(0, 1))(ys, r.weights)
    gb = jax.grad(lambda ys, w: jnp.sum(unpermute_combine(ys, order, w) * p2), argnums=(0, 1))(ys, r.weights)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol(dtype))


@pytest.mark.parametrize("platform, backend", [("cuda", "gpu"), ("tpu", "tpu")])
def test_kernels_lower_for_their_platform(platform, backend):
    S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    kw = dict(backend=backend, interpret=False)
    fns = [
        (jax.grad(lambda a, b, s: jnp.sum(gmm(a, b, s, **kw).astype(jnp.float32)), argnums=(0, 1)),
         (S((512, 256), bf), S((8, 256, 384), bf), S((8,), jnp.int32))),
        (jax.grad(lambda x, o, w: jnp.sum(combine_tokens(permute_tokens(x, o, 2, **kw), o, w, **kw)), argnums=(0, 2)),
         (S((256, 256), bf), S((512,), jnp.int32), S((256, 2), jnp.float32))),
    ]
    for fn, args in fns:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        assert ("triton" in text) if backend == "gpu" else ("tpu_custom_call" in text)


def test_tiling_heuristic_and_autotune():
    assert tiling_for("gpu", 4096, 4096, 14336, 8, jnp.bfloat16) == (64, 64, 256)
    assert tiling_for("gpu", 16384, 4096, 14336, 8, jnp.bfloat16) == (128, 64, 256)
    assert gpu_launch(128, 256, 48 * 1024) == (8, 4) and gpu_launch(64, 128) == (4, 3)
    assert gpu_launch(64, 256, 80 * 1024) == (4, 2)  # shared memory caps the pipeline depth
    assert tiling_for("gpu", 64, 24, 40, 8, jnp.float32) == (64, 32, 64)
    t = tiling_for("tpu", 100, 40, 20, 4, jnp.float32)
    assert t[1] % 128 == 0 and t[2] % 128 == 0
    before = DEFAULT_TILINGS.get("gpu", 64, 32, 32, 4, jnp.float32)
    lines = []
    table = autotune(64, 32, 32, 4, jnp.float32, backend="gpu", candidates=[(16, 16, 16), (32, 32, 32)], repeats=1,
                     log=lines.append)
    assert len(lines) == 2 and len(table.entries) == 1
    best = table.get("gpu", 64, 32, 32, 4, jnp.float32)
    assert best in [(16, 16, 16), (32, 32, 32)] and tiling_for("gpu", 64, 32, 32, 4, jnp.float32, table) == best
    # a new table: the default (and every other table) is unchanged
    assert DEFAULT_TILINGS.entries == () and DEFAULT_TILINGS.get("gpu", 64, 32, 32, 4, jnp.float32) == before
    # another shape goes on top of the given table
    table2 = autotune(32, 16, 16, 2, jnp.float32, tilings=table, backend="gpu", candidates=[(16, 16, 16)], repeats=1)
    assert len(table2.entries) == 2 and len(table.entries) == 1
    assert table2.get("gpu", 64, 32, 32, 4, jnp.float32) == best
    with pytest.raises(ValueError, match="no candidate tiling ran"):
        autotune(64, 32, 32, 4, jnp.float32, backend="gpu", candidates=[(16, 16, 0)], repeats=1)


def test_tiling_table_is_an_immutable_value_saved_as_json(tmp_path):
    key = tuning_key("gpu", 100, 32, 48, 4, jnp.bfloat16)
    assert key == "gpu:bfloat16:m128:k32:n48:g4"  # m rounds up to a power of two
    table = TilingTable({key: [32, 16, 16]})
    assert table.get("gpu", 120, 32, 48, 4, jnp.bfloat16) == (32, 16, 16)
    assert table.get("gpu", 120, 32, 48, 8, jnp.bfloat16) == DEFAULT_TILINGS.get("gpu", 120, 32, 48, 8, jnp.bfloat16)
    assert table == TilingTable([(key, (32, 16, 16))]) and hash(table) == hash(TilingTable({key: (32, 16, 16)}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.entries = ()
    other = (table.with_tiling("gpu", 100, 32, 48, 4, jnp.bfloat16, (64, 32, 16))
             .with_tiling("tpu", 8, 8, 8, 1, jnp.float32, (16, 128, 128)))
    assert table.get("gpu", 100, 32, 48, 4, jnp.bfloat16) == (32, 16, 16)
    assert other.get("gpu", 100, 32, 48, 4, jnp.bfloat16) == (64, 32, 16) and len(other.entries) == 2
    assert table.merge(other) == other and other.merge(table).get("gpu", 100, 32, 48, 4, jnp.bfloat16) == (32, 16, 16)
    path = tmp_path / "tilings.json"
    other.save(path)
    assert json.loads(path.read_text()) == {key: [64, 32, 16], "tpu:float32:m8:k8:n8:g1": [16, 128, 128]}
    assert TilingTable.load(path) == other
    with pytest.raises(ValueError, match="three positive ints"):
        TilingTable({key: [64, 32]})


def test_gmm_takes_its_tilings_forward_and_backward_from_the_table(monkeypatch):
    M, K, N, E = 40, 24, 20, 3
    sizes = jnp.array([15, 0, 25], jnp.int32)
    lhs = jax.random.normal(jax.random.key(0), (M, K))
    rhs = jax.random.normal(jax.random.key(1), (E, K, N))
    table = (TilingTable()
             .with_tiling("gpu", M, K, N, E, jnp.float32, (16, 16, 32))  # forward gmm and the tgmm
             .with_tiling("gpu", M, N, K, E, jnp.float32, (32, 32, 16)))  # the backward's lhs gmm
    seen = []

    def spy(name):
        real = getattr(ops.gmm_gpu, name)
        return lambda *a, **kw: seen.append((name, kw["tiling"])) or real(*a, **kw)

    for name in ("gmm_gpu", "tgmm_gpu"):
        monkeypatch.setattr(ops.gmm_gpu, name, spy(name))
    f = lambda a, b, t: jnp.sum(gmm(a, b, sizes, tilings=t, backend="gpu", interpret=INTERPRET) ** 2)
    g_table = jax.grad(f, argnums=(0, 1))(lhs, rhs, table)
    assert seen == [("gmm_gpu", (16, 16, 32)), ("gmm_gpu", (32, 32, 16)), ("tgmm_gpu", (16, 16, 32))]
    g_default = jax.grad(f, argnums=(0, 1))(lhs, rhs, DEFAULT_TILINGS)
    assert seen[3:] == [("gmm_gpu", (64, 32, 32)), ("gmm_gpu", (64, 32, 32)), ("tgmm_gpu", (64, 32, 32))]
    for a, b in zip(g_table, g_default):
        np.testing.assert_allclose(a, b, **tol(jnp.float32))
    with pytest.raises(TypeError, match="TilingTable"):
        gmm(lhs, rhs, sizes, tilings=(16, 16, 16))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_ffn_equals_ffn_per_expert(activation):
    E, d, f = 3, 8, 12
    sizes = np.array([5, 0, 9])
    xs = jax.random.normal(jax.random.key(0), (int(sizes.sum()) + 3, d))  # 3 trailing rows in no group
    ks = jax.random.split(jax.random.key(1), 3)
    params = {"w_up": jax.random.normal(ks[0], (E, d, f)), "w_down": jax.random.normal(ks[1], (E, f, d)) / f**0.5}
    if activation == "swiglu":
        params["w_gate"] = jax.random.normal(ks[2], (E, d, f))
    y = grouped_ffn(params, xs, jnp.asarray(sizes, jnp.int32), activation, interpret=INTERPRET)
    ends = np.cumsum(sizes)
    expected = [ffn(jax.tree.map(lambda a: a[e], params), xs[ends[e] - sizes[e]:ends[e]], activation) for e in range(E)]
    np.testing.assert_allclose(y[: ends[-1]], jnp.concatenate(expected), **tol(jnp.float32))
    assert np.all(np.asarray(y[ends[-1]:]) == 0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="lhs has k=3"):
        gmm(jnp.ones((4, 3)), jnp.ones((2, 5, 6)), jnp.array([2, 2]))
    with pytest.raises(ValueError, match="group_sizes"):
        gmm(jnp.ones((4, 3)), jnp.ones((2, 3, 6)), jnp.array([2.0, 2.0]))
    with pytest.raises(ValueError, match="backend"):
        gmm(jnp.ones((4, 3)), jnp.ones((2, 3, 6)), jnp.array([2, 2]), backend="cuda")
