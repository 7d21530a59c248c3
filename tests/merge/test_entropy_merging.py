"""AdaMerging (`jmoe.merge.adamerging`): coefficients learned by prediction-entropy minimisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import merge
from jmoe.merge import MergeError, prediction_entropy

RNG = np.random.default_rng(0)
BASE = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}


def task_model(rows, cls):
    """A fine-tune that makes inputs on `rows` predict class `cls` confidently."""
    w = np.zeros((4, 3), np.float32)
    w[rows, cls] = 3.0
    return {"w": jnp.asarray(w), "b": jnp.zeros(3)}


MODELS = [task_model([0, 1], 0), task_model([2, 3], 2)]


def inputs(rows, n=8, seed=0):
    x = np.zeros((n, 4), np.float32)
    x[:, rows] = np.random.default_rng(seed).uniform(0.5, 1.5, (n, len(rows)))
    return jnp.asarray(x)


BATCHES = [[inputs([0, 1], seed=s) for s in range(2)], [inputs([2, 3], seed=s) for s in range(2)]]
traces = []


def objective(params, x):
    traces.append(1)  # runs while tracing only
    return prediction_entropy(x @ params["w"] + params["b"])


def test_zero_steps_is_task_arithmetic_at_the_prior():
    out = merge.adamerging(BASE, MODELS, BATCHES, objective=objective, steps=0, prior=0.3)
    want = merge.task_arithmetic(BASE, MODELS, lam=0.3)
    np.testing.assert_allclose(out["w"], want["w"], atol=1e-6)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_learns_coefficients_that_lower_the_entropy(granularity):
    traces.clear()
    losses = []
    out, lam = merge.adamerging(BASE, MODELS, BATCHES, objective=objective, granularity=granularity, steps=60,
                                lr=0.05, log=lambda s, loss: losses.append(loss), return_lambdas=True)
    assert len(losses) == 60 and losses[-1] < 0.5 * losses[0]
    assert len(traces) == 2  # one trace of the step (one objective call per task), reused for every step
    assert lam.shape == ((2,) if granularity == "task" else (2, 2))
    w_row = lam if granularity == "task" else lam[1]  # leaves in tree order: b, w
    assert np.all((0 <= lam) & (lam <= 1)) and np.all(w_row > 0.9)
    np.testing.assert_allclose(out["w"], merge.task_arithmetic(BASE, MODELS, weights=list(np.asarray(w_row)))["w"],
                               atol=1e-5)


def test_prediction_entropy_with_a_mask():
    logits = jnp.asarray(RNG.standard_normal((2, 5, 7)), jnp.float32)
    mask = jnp.asarray(RNG.random((2, 5)) < 0.5)
    p = jax.nn.softmax(logits, -1)
    ent = -jnp.sum(p * jnp.log(p), -1)
    np.testing.assert_allclose(prediction_entropy(logits, mask), jnp.sum(ent * mask) / jnp.sum(mask), rtol=1e-5)
    np.testing.assert_allclose(prediction_entropy(logits), jnp.mean(ent), rtol=1e-5)


def test_bad_inputs():
    with pytest.raises(MergeError, match="one non-empty sequence of unlabeled batches per model"):
        merge.adamerging(BASE, MODELS, BATCHES[:1], objective=objective)
    with pytest.raises(MergeError, match="granularity"):
        merge.adamerging(BASE, MODELS, BATCHES, objective=objective, granularity="block")
    with pytest.raises(MergeError, match="base is required"):
        merge.adamerging(None, MODELS, BATCHES, objective=objective)
    with pytest.raises(MergeError, match="objective"):
        merge.adamerging(BASE, MODELS, BATCHES)
