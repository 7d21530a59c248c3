"""PLeaS (`jmoe.merge.pleas`): permutation matching plus layer-wise least squares, merging two
models from different initialisations into a model of a chosen width."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.merge import MergeError, pleas
from jmoe.merge.pleas import match, permute_residual, record
from jmoe.nn import LMConfig, init_lm, lm_apply

CFG = LMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24, max_seq_len=32)
TOKENS = [np.random.default_rng(s).integers(0, 32, (4, 16)).astype(np.int32) for s in range(4)]


def logits(cfg, params):
    return np.concatenate([np.asarray(lm_apply(params, jnp.asarray(t), cfg)[0]) for t in TOKENS])


def permuted(params, rng):
    """The same function with its residual units and each FFN's hidden units reordered."""
    p = permute_residual(params, CFG, rng.permutation(CFG.d_model))
    for layer in p["layers"].values():
        h = rng.permutation(CFG.d_ff)
        layer["ffn"] = {"w_gate": layer["ffn"]["w_gate"][:, h], "w_up": layer["ffn"]["w_up"][:, h],
                        "w_down": layer["ffn"]["w_down"][h]}
    return jax.tree.map(jnp.asarray, p)


@pytest.fixture(scope="module")
def models():
    a = init_lm(jax.random.key(0), CFG)
    b = init_lm(jax.random.key(1), CFG)
    return a, b


def test_a_permuted_copy_is_matched_back(models):
    a, _ = models
    b = permuted(a, np.random.default_rng(3))
    np.testing.assert_allclose(logits(CFG, b), logits(CFG, a), rtol=1e-4, atol=1e-4)  # the same function
    ra, rb = record(a, CFG, TOKENS), record(b, CFG, TOKENS)
    perm, _ = match(ra.resid, rb.resid)
    np.testing.assert_allclose(rb.resid[1][:, perm], ra.resid[1], atol=1e-5)
    for ratio in (0.0, 0.5, 1.0):
        for ls in (False, True):
            cfg, merged = pleas(CFG, a, b, TOKENS, ratio=ratio, least_squares=ls)
            assert cfg.d_ff == CFG.d_ff + round(ratio * CFG.d_ff) and cfg.n_heads == 8 and cfg.n_kv_heads == 4
            np.testing.assert_allclose(logits(cfg, merged), logits(CFG, a), rtol=2e-3, atol=2e-3)


def markov_tokens(n, seed):
    """[n, 17] sequences of a fixed random Markov chain over the 32 tokens."""
    trans = np.cumsum(np.random.default_rng(0).dirichlet(np.full(32, 0.2), 32), axis=1)
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 17), np.int32)
    x[:, 0] = rng.integers(0, 32, n)
    for t in range(1, 17):
        x[:, t] = np.minimum((trans[x[:, t - 1]] < rng.random((n, 1))).sum(1), 31)
    return x


def trained(seed, data, steps=200):
    import optax

    def loss(p, x):
        return optax.softmax_cross_entropy_with_integer_labels(lm_apply(p, x[:, :-1], CFG)[0], x[:, 1:]).mean()

    p, opt = init_lm(jax.random.key(seed), CFG), optax.adam(3e-3)
    state = opt.init(p)

    @jax.jit
    def step(p, state, x):
        g = jax.grad(loss)(p, x)
        u, state = opt.update(g, state)
        return optax.apply_updates(p, u), state

    for i in range(steps):
        p, state = step(p, state, jnp.asarray(data[(32 * i) % len(data):][:32]))
    return p, jax.jit(loss)


@pytest.mark.slow
def test_least_squares_beats_permuting_alone_on_two_trained_models():
    """Two models trained from different initialisations on one Markov chain: refitting every
    layer by least squares gives a better merge than the permuted weights alone, and a wider
    merge a better one still (the paper's claim against permutation-only merging)."""
    data, held = markov_tokens(512, 1), jnp.asarray(markov_tokens(128, 2))
    (a, loss), (b, _) = trained(0, data), trained(1, data)
    calib = [data[i:i + 32, :-1] for i in range(0, 128, 32)]
    got = {}
    for ratio in (0.0, 1.0):
        for ls in (False, True):
            cfg, merged = pleas(CFG, a, b, calib, ratio=ratio, least_squares=ls)
            got[ratio, ls] = float(optax_loss(cfg, merged, held))
    assert got[0.0, True] < got[0.0, False] - 0.05 and got[1.0, True] < got[1.0, False] - 0.05, got
    assert got[1.0, True] < got[0.0, True], got
    assert float(loss(a, held)) < got[1.0, True]  # still far from either model


def optax_loss(cfg, params, x):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(lm_apply(params, x[:, :-1], cfg)[0], x[:, 1:]).mean()


def test_bad_inputs(models):
    a, b = models
    with pytest.raises(MergeError, match="ratio"):
        pleas(CFG, a, b, TOKENS, ratio=1.5)
    with pytest.raises(MergeError, match="batches"):
        pleas(CFG, a, b, [])
    with pytest.raises(MergeError, match=r"batches\[0\]: tokens must be an integer"):
        pleas(CFG, a, b, [np.zeros((2, 3), np.float32)])
    with pytest.raises(MergeError, match=r"batches\[1\]: token ids must be in \[0, 32\)"):
        pleas(CFG, a, b, [TOKENS[0], TOKENS[1] + 32])
    with pytest.raises(MergeError, match="ridge"):
        pleas(CFG, a, b, TOKENS, ridge=0.0)
    with pytest.raises(MergeError, match="ratio='x'"):
        pleas(CFG, a, b, TOKENS, ratio="x")
    small = init_lm(jax.random.key(2), CFG.replace(d_ff=8))
    with pytest.raises(MergeError, match=r"params_b\['layers'\]\['0'\]\['ffn'\]\['w_down'\] has shape \(8, 16\), cfg says "
                                         r"\(24, 16\)"):
        pleas(CFG, a, small, TOKENS)
    with pytest.raises(MergeError, match="dense models"):
        from jmoe.config import MoEConfig

        pleas(CFG.replace(moe=MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2)), a, b, TOKENS)
