"""UOE (`jmoe.editing.unlearn`): unlearning in the expert most tied to the forget data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.config import MoEConfig
from jmoe.editing import expert_affinity, target_expert, unlearn
from jmoe.nn import LMConfig, init_lm, lm_apply

CFG = LMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=32,
               moe=MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2))
FORGET = [np.random.default_rng(s).integers(0, 16, (4, 12)).astype(np.int32) for s in range(2)]
RETAIN = [np.random.default_rng(9 + s).integers(16, 32, (4, 12)).astype(np.int32) for s in range(2)]


@pytest.fixture(scope="module")
def params():
    return init_lm(jax.random.key(0), CFG)


def test_affinity_is_the_router_probability_averaged_per_sequence_then_over_sequences(params):
    aff = expert_affinity(CFG, params, FORGET)
    assert aff.shape == (2, 4)
    rows = []
    for b in FORGET:
        _, aux = lm_apply(params, jnp.asarray(b), CFG)
        rows.append(np.stack([np.asarray(a.routing.probs).reshape(4, 12, 4).mean(1) for a in aux.moe]))  # [L, B, E]
    np.testing.assert_allclose(aff, np.concatenate(rows, 1).mean(1), rtol=1e-5)
    np.testing.assert_allclose(aff.sum(1), 1.0, rtol=1e-5)
    layer, expert = target_expert(CFG, aff)
    assert aff[CFG.moe_layers.index(layer), expert] == aff.max()


def test_only_the_target_expert_and_its_router_change(params):
    out, info = unlearn(CFG, params, FORGET, steps=3, lr=1e-2)
    L, e = str(info["layer"]), info["expert"]
    assert info["trainable_params"] == 3 * 16 * 8 + 16 * 4
    for path, a in jax.tree_util.tree_leaves_with_path(params):
        key = jax.tree_util.keystr(path)
        b = out
        for k in path:
            b = b[k.key]
        if f"['{L}']['moe']['experts']" in key:
            others = np.delete(np.arange(4), e)
            np.testing.assert_array_equal(np.asarray(b)[others], np.asarray(a)[others])
            assert not np.array_equal(np.asarray(b)[e], np.asarray(a)[e]), key
        elif f"['{L}']['moe']['router']" in key:
            assert not np.array_equal(np.asarray(b), np.asarray(a)), key
        else:
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=key)


def ce(params, batches):
    from jmoe.editing.uoe import _lm_loss

    return float(np.mean([_lm_loss(params, jnp.asarray(b), CFG, None) for b in batches]))


def test_gradient_ascent_forgets_and_the_anchor_keeps_the_router_on_the_expert(params):
    aff0 = expert_affinity(CFG, params, FORGET)
    out = {}
    for alpha in (0.0, 10.0):
        out[alpha], info = unlearn(CFG, params, FORGET, steps=20, lr=3e-2, alpha=alpha)
        assert ce(out[alpha], FORGET) > ce(params, FORGET) + 0.05 and info["loss_last"] < info["loss_first"]
    li, e = CFG.moe_layers.index(info["layer"]), info["expert"]
    anchored = expert_affinity(CFG, out[10.0], FORGET)[li, e]
    assert anchored > aff0[li, e] and anchored > expert_affinity(CFG, out[0.0], FORGET)[li, e]
    # the whole model, for comparison, moves every parameter
    full, info = unlearn(CFG, params, FORGET, RETAIN, scope="all", method="gdiff", steps=2, lr=1e-2)
    assert info["trainable_params"] == info["total_params"] and "layer" not in info
    assert not np.array_equal(np.asarray(full["embed"]["w"]), np.asarray(params["embed"]["w"]))


def test_npo_starts_at_2_log_2_over_beta(params):
    seen = []
    out, info = unlearn(CFG, params, FORGET, method="npo", npo_beta=0.5, alpha=0.0, steps=2,
                        callback=lambda s, p: seen.append((s, p)))
    np.testing.assert_allclose(info["loss_first"], 2 / 0.5 * np.log(2), rtol=1e-5)
    assert [s for s, _ in seen] == [1, 2]
    jax.tree.map(np.testing.assert_array_equal, seen[-1][1], out)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="rmu"), "method='rmu'"),
    (dict(scope="layer"), "scope='layer'"),
    (dict(method="gdiff"), "needs retain"),
    (dict(layer=0, expert=7), r"expert=7 must be in \[0, 4\)"),
    (dict(layer=5, expert=0), "layer=5 is not an MoE layer"),
    (dict(layer=0), "both layer and expert"),
    (dict(steps=1.5), "steps=1.5"),
    (dict(forget=[np.zeros((2, 5), np.float32)]), r"forget\[0\] must be an integer"),
    (dict(forget=[np.full((2, 5), 40)]), r"forget\[0\]: token ids must be in \[0, 32\)"),
])
def test_bad_input(params, kwargs, message):
    forget = kwargs.pop("forget", FORGET)
    with pytest.raises(ValueError, match=message):
        unlearn(CFG, params, forget, **kwargs)
