"""Mowst's pieces (`jmoe.nn.mowst`): the dispersion measures of the reference, the weak
expert's windows, the expected loss and its gradients, and parameter checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.nn.mowst import (MowstConfig, check_mowst_params, dispersion, init_mowst, mowst_loss, mowst_scores,
                           weak_logits, windows)

MCFG = MowstConfig(window=3, embed_dim=4, hidden=8, layers=2, gate_hidden=4)


def test_dispersion_is_the_reference_variance_and_entropy_confidence():
    logits = jax.random.normal(jax.random.key(0), (5, 7)) * 2
    p = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    one_hot = np.eye(7)[0]
    var_conf = np.var(p, axis=-1) / np.var(one_hot)  # the reference's var(p) / var(one-hot)
    ent_conf = 1 + np.sum(p * np.log(p), axis=-1) / np.log(7)
    np.testing.assert_allclose(np.asarray(dispersion(logits)), np.stack([var_conf, ent_conf], -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dispersion(jnp.zeros((1, 7)))), [[0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(dispersion(jnp.asarray([[60.0] + [0.0] * 6]))), [[1.0, 1.0]], atol=1e-5)
    assert float(jnp.abs(jax.grad(lambda x: jnp.sum(dispersion(x)))(logits)).max()) == 0.0  # detached


def test_windows_look_back_and_pad_before_the_start():
    got = np.asarray(windows(jnp.asarray([[5, 6, 7, 8]]), 3, 99))
    assert got.tolist() == [[[5, 99, 99], [6, 5, 99], [7, 6, 5], [8, 7, 6]]]


def test_weak_logits_see_only_their_window_and_take_given_windows():
    params = init_mowst(jax.random.key(1), 11, MCFG)
    toks = jnp.asarray([[1, 2, 3, 4, 5, 6], [9, 9, 3, 4, 5, 6]])
    out = weak_logits(params["weak"], toks, MCFG)
    assert out.shape == (2, 6, 11)
    np.testing.assert_allclose(out[0, 4:], out[1, 4:], rtol=1e-6)  # same last three tokens
    assert not np.allclose(out[0, 2], out[1, 2])
    given = weak_logits(params["weak"], windows(toks, 3, 11), MCFG)
    np.testing.assert_allclose(given, out, rtol=1e-6)


def test_expected_loss_and_its_gradients():
    nw, ns = jnp.asarray([[1.0, 3.0]]), jnp.asarray([[2.0, 0.5]])
    c = jnp.asarray([[0.25, 0.75]])
    assert float(mowst_loss(nw, ns, c)) == pytest.approx((0.25 * 1 + 0.75 * 2 + 0.75 * 3 + 0.25 * 0.5) / 2)
    dc = jax.grad(mowst_loss, argnums=2)(nw, ns, c)
    np.testing.assert_allclose(dc, (nw - ns) / 2)  # the gate learns L_w - L_s
    s = mowst_scores(nw, ns, c, 0.5)
    assert s["threshold_skip"] == 0.5 and s["threshold_loss"] == pytest.approx((2.0 + 3.0) / 2)
    assert s["expected_skip"] == pytest.approx(0.5) and s["weak_loss"] == 2.0 and s["strong_loss"] == 1.25


def test_parameter_checks_name_the_leaf():
    params = init_mowst(jax.random.key(0), 11, MCFG)
    check_mowst_params(params, 11, MCFG)
    with pytest.raises(ValueError, match=r"weak/embed has shape \(12, 4\), expected \(13, 4\)"):
        check_mowst_params(params, 12, MCFG)
    bad = {**params, "gate": {"0": params["gate"]["0"]}}
    with pytest.raises(ValueError, match="gate/1/b is missing"):
        check_mowst_params(bad, 11, MCFG)
    with pytest.raises(ValueError, match="unexpected leaf gate/2/w"):
        check_mowst_params({**params, "gate": {**params["gate"], "2": {"w": jnp.zeros(1)}}}, 11, MCFG)
    with pytest.raises(ValueError, match="vocab_size"):
        init_mowst(jax.random.key(0), 1, MCFG)
    with pytest.raises(ValueError, match="window"):
        MowstConfig(window=0)
