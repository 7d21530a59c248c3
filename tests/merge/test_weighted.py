import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig, merge
from jmoe.merge import MergeError
from jmoe.nn import LMConfig, init_lm


def test_diagonal_fisher_matches_squared_gradients():
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    batches = [jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[0.5, -1.0, 2.0]])]
    loss = lambda p, b: jnp.sum((b @ p["w"]) ** 2)
    F = merge.diagonal_fisher(loss, params, batches)
    grads = [2 * (b @ params["w"]) * b[0] for b in batches]
    np.testing.assert_allclose(F["w"], np.mean([g**2 for g in grads], 0), rtol=1e-5)
    big = jnp.concatenate(batches)
    F2 = merge.diagonal_fisher(loss, params, [big], per_example=True)  # two examples in one batch
    np.testing.assert_allclose(F2["w"], np.mean([g**2 for g in grads], 0), rtol=1e-5)


def test_lm_grams_and_regmean_on_a_moe_lm():
    cfg = LMConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8, moe_every=2,
                   moe=MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8, num_shared_experts=1))
    p1, p2 = init_lm(jax.random.key(0), cfg), init_lm(jax.random.key(1), cfg)
    batches = [jax.random.randint(jax.random.key(i), (2, 8), 0, 256) for i in range(2)]
    g1 = merge.lm_grams(p1, cfg, batches)
    assert g1["layers/0/attn/wq"].shape == (16, 16)
    assert g1["layers/0/attn/wo"].shape == (16, 16)  # H * Dh
    assert g1["layers/0/ffn/w_down"].shape == (32, 32)
    assert g1["layers/1/moe/experts/w_up"].shape == (4, 16, 16)
    assert g1["layers/1/moe/experts/w_down"].shape == (4, 8, 8)
    assert g1["layers/1/moe/shared/w_down"].shape == (8, 8)
    assert g1["layers/1/moe/router/w"].shape == (16, 16) and g1["unembed/w"].shape == (16, 16)
    # symmetric PSD
    G = np.asarray(g1["layers/0/attn/wq"])
    np.testing.assert_allclose(G, G.T, atol=1e-5)
    assert np.linalg.eigvalsh(G).min() > -1e-4
    # RegMean of a model with itself returns it where the Gram matrix has full rank (32 tokens
    # of width 16); with another model it solves the normal equations
    same = merge.regmean([p1, p1], [g1, g1])
    for name in ("wq", "wk", "wv", "wo"):
        np.testing.assert_allclose(same["layers"]["0"]["attn"][name], p1["layers"]["0"]["attn"][name], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(same["embed"]["w"], p1["embed"]["w"])  # no Gram: the mean
    g2 = merge.lm_grams(p2, cfg, batches)
    out = merge.regmean([p1, p2], [g1, g2], alpha=0.9)
    e = 2
    Gs = [0.9 * np.asarray(g["layers/1/moe/experts/w_up"][e]) + 0.1 * np.diag(np.diag(g["layers/1/moe/experts/w_up"][e]))
          for g in (g1, g2)]
    W = [np.asarray(p["layers"]["1"]["moe"]["experts"]["w_up"][e]) for p in (p1, p2)]
    want = np.linalg.solve(sum(Gs) + 1e-6 * np.mean(np.diag(sum(Gs))) * np.eye(16), sum(g @ w for g, w in zip(Gs, W)))
    np.testing.assert_allclose(out["layers"]["1"]["moe"]["experts"]["w_up"][e], want, rtol=1e-3, atol=1e-4)


def test_regmean_and_fisher_name_what_does_not_fit():
    m1, m2 = {"w": jnp.ones((4, 3))}, {"w": jnp.zeros((4, 3))}
    G = jnp.eye(4)
    np.testing.assert_allclose(merge.regmean([m1, m2], [{"w": G}, {"w": G}])["w"], 0.5, atol=1e-5)
    with pytest.raises(MergeError, match="grams\\[0\\] has a Gram matrix for 'nope', which is not a leaf"):
        merge.regmean([m1, m2], [{"nope": G}, {"nope": G}])
    with pytest.raises(MergeError, match=r"grams\[1\]\['w'\] has shape \(5, 5\), which does not fit the weight \(4, 3\)"):
        merge.regmean([m1, m2], [{"w": G}, {"w": jnp.eye(5)}])
    with pytest.raises(MergeError, match="eps=-1"):
        merge.fisher([m1, m2], [m1, m1], eps=-1)
