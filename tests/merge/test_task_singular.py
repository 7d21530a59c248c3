"""TSV-M (`jmoe.merge.tsvm`) against a numpy transcription of the reference code's
fixed-size layout (task blocks placed side by side in zero-padded U, S, V)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import merge
from jmoe.merge import MergeError


def reference_tsv(deltas, sv_reduction):
    """The reference's per-matrix merge: zero-padded blocks of each task's top singular
    triplets, the SVD-based orthogonalisation of U and V, then U_perp S V_perp."""
    deltas = [np.asarray(d, np.float64) for d in deltas]
    u0, s0, v0 = np.linalg.svd(deltas[0], full_matrices=False)
    sum_u, sum_s, sum_v = np.zeros_like(u0), np.zeros_like(s0), np.zeros_like(v0)
    k = int(s0.shape[0] * sv_reduction)
    for i, d in enumerate(deltas):
        u, s, v = np.linalg.svd(d, full_matrices=False)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k, :] = v[:k, :]
    u_u, _, v_u = np.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = np.linalg.svd(sum_v, full_matrices=False)
    return np.linalg.multi_dot([u_u, v_u, np.diag(sum_s), u_v, v_v])


def trees(n, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"attn": {"w": (6, 10)}, "experts": {"w_up": (2, 6, 10)}, "norm": {"scale": (10,)}}
    base = {g: {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in d.items()} for g, d in shapes.items()}
    models = [{g: {k: v + 0.1 * jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in d.items()}
               for g, d in base.items()} for _ in range(n)]
    return base, models


@pytest.mark.parametrize("n, sv_reduction", [(3, None), (4, None), (2, 0.3)])
def test_equals_the_reference_per_matrix_and_means_vectors(n, sv_reduction):
    base, models = trees(n)
    weights = [1.0, 0.5, 0.8, 1.2][:n]
    out = merge.tsvm(base, models, weights=weights, lam=0.9, sv_reduction=sv_reduction)
    frac = 1 / n if sv_reduction is None else sv_reduction
    deltas = lambda g, k: [w * (np.asarray(m[g][k], np.float64) - np.asarray(base[g][k], np.float64))
                           for w, m in zip(weights, models)]
    want = np.asarray(base["attn"]["w"]) + 0.9 * reference_tsv(deltas("attn", "w"), frac)
    np.testing.assert_allclose(out["attn"]["w"], want, rtol=1e-4, atol=1e-5)
    for e in range(2):  # stacked experts: one matrix each
        want = np.asarray(base["experts"]["w_up"][e]) + 0.9 * reference_tsv([d[e] for d in deltas("experts", "w_up")], frac)
        np.testing.assert_allclose(out["experts"]["w_up"][e], want, rtol=1e-4, atol=1e-5)
    want = np.asarray(base["norm"]["scale"]) + 0.9 * np.mean(deltas("norm", "scale"), axis=0)
    np.testing.assert_allclose(out["norm"]["scale"], want, rtol=1e-5, atol=1e-6)
    assert out["attn"]["w"].dtype == jnp.float32


def test_one_task_at_full_rank_is_that_model():
    base, (model,) = trees(1)
    out = merge.tsvm(base, [model])
    for g in base:
        for k in base[g]:
            np.testing.assert_allclose(out[g][k], model[g][k], rtol=1e-5, atol=1e-5)


def test_task_vectors_in_orthogonal_subspaces_add_up():
    """When the tasks' low-rank task vectors use disjoint rows and columns, there is no
    interference to remove: TSV-M is task arithmetic."""
    rng = np.random.default_rng(1)
    base = {"w": jnp.asarray(rng.standard_normal((8, 12)), jnp.float32)}
    models = []
    for i in range(4):  # task i: a rank-2 update on rows 2i..2i+1 and columns 3i..3i+2
        d = np.zeros((8, 12), np.float32)
        d[2 * i:2 * i + 2, 3 * i:3 * i + 3] = rng.standard_normal((2, 3))
        models.append({"w": base["w"] + d})
    got = merge.tsvm(base, models)["w"]
    np.testing.assert_allclose(got, merge.task_arithmetic(base, models)["w"], rtol=1e-5, atol=1e-5)
    # interfering tasks (one shared direction) are not simply added
    shared = {"w": base["w"] + jnp.outer(jnp.ones(8), jnp.ones(12))}
    got = merge.tsvm(base, [shared, shared])["w"]
    assert not np.allclose(got, merge.task_arithmetic(base, [shared, shared])["w"], atol=1e-3)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.2])
def test_bad_inputs_are_named(bad):
    base, models = trees(2)
    with pytest.raises(MergeError, match="sv_reduction"):
        merge.tsvm(base, models, sv_reduction=bad)
    with pytest.raises(MergeError, match="base"):
        merge.tsvm(None, models)
    models[1]["attn"]["w"] = jnp.zeros((6, 9))
    with pytest.raises(MergeError, match="attn"):
        merge.tsvm(base, models)
