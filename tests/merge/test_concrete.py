"""CONCRETE (`jmoe.merge.concrete`): a task-shared mask learned through a concrete relaxation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import merge
from jmoe.merge import MergeError
from jmoe.merge.concrete_subspace import sample_mask
from tests.merge.test_entropy_merging import BATCHES, objective, traces  # the same unlabeled inputs and entropy

BASE = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}


def task_model(rows, cls, others):
    """A fine-tune that makes inputs on `rows` predict class `cls`, and that also moves the
    other task's rows towards class 1 (interference, weaker than the task's own signal)."""
    w = np.zeros((4, 3), np.float32)
    w[rows, cls] = 3.0
    w[others, 1] = 2.0
    return {"w": jnp.asarray(w), "b": jnp.zeros(3)}


MODELS = [task_model([0, 1], 0, [2, 3]), task_model([2, 3], 2, [0, 1])]


def entropy(params):
    return float(sum(objective(params, b[0]) for b in BATCHES))


def test_sample_mask_is_a_rescaled_relaxed_bernoulli():
    logits = [jnp.asarray(np.random.default_rng(0).standard_normal((5, 7)), jnp.float32)]
    key = jax.random.key(3)
    (m,) = sample_mask(logits, key, 0.5)
    u = jax.random.uniform(jax.random.split(key, 1)[0], (5, 7), jnp.float32, minval=1e-6, maxval=1 - 1e-6)
    want = jax.nn.sigmoid((logits[0] + jnp.log(u) - jnp.log1p(-u)) / 0.5)
    np.testing.assert_allclose(m, want / want.mean(), rtol=1e-5)
    np.testing.assert_allclose(m.mean(), 1.0, rtol=1e-5)
    # a confident logit keeps (almost) every entry: the mask is then ones
    (ones,) = sample_mask([jnp.full((5, 7), 30.0)], key, 0.5)
    np.testing.assert_allclose(ones, 1.0, atol=1e-6)


@pytest.mark.parametrize("adamerging", [None, "layer"])
def test_a_mask_that_keeps_everything_is_task_arithmetic(adamerging):
    out = merge.concrete(BASE, MODELS, BATCHES, objective=objective, adamerging=adamerging, steps=0,
                         adamerging_steps=0, initial_logits=30.0)
    np.testing.assert_allclose(out["w"], merge.task_arithmetic(BASE, MODELS, lam=0.3)["w"], atol=1e-5)


@pytest.mark.parametrize("adamerging", [None, "task"])
def test_the_mask_drops_the_interference_and_lowers_the_entropy(adamerging):
    traces.clear()
    losses = []
    # (a meta-learning step's inner lambda step at the reference's lr 1 leaves lambda far from
    # the prior: at this size that decides which class an input's entropy favours)
    out, keep = merge.concrete(BASE, MODELS, BATCHES, objective=objective, adamerging=adamerging, steps=150, lr=0.05,
                               inner_lr=0.05, adamerging_steps=20, adamerging_lr=0.05,
                               log=lambda s, loss: losses.append(loss), return_mask=True)
    assert len(losses) == 150 + (20 if adamerging else 0)
    # each step traced once: one objective call per task (twice in a meta-learning step), then AdaMerging's
    assert len(traces) == (2 if adamerging is None else 4 + 2)
    k = np.asarray(keep["w"])
    task_entries = np.concatenate([k[[0, 1], 0], k[[2, 3], 2]])
    interference = k[:, 1]
    assert task_entries.min() > 0.5 > interference.max(), k
    assert entropy(out) < 0.8 * entropy(merge.task_arithmetic(BASE, MODELS, lam=0.3))


def test_bad_inputs():
    with pytest.raises(MergeError, match="one non-empty sequence of unlabeled batches per model"):
        merge.concrete(BASE, MODELS, BATCHES[:1], objective=objective)
    with pytest.raises(MergeError, match="adamerging"):
        merge.concrete(BASE, MODELS, BATCHES, objective=objective, adamerging="block")
    with pytest.raises(MergeError, match="temperature"):
        merge.concrete(BASE, MODELS, BATCHES, objective=objective, temperature=0.0)
    with pytest.raises(MergeError, match="base is required for concrete"):
        merge.concrete(None, MODELS, BATCHES, objective=objective)
    with pytest.raises(MergeError, match=r"models\[1\]"):
        merge.concrete(BASE, [MODELS[0], {"w": jnp.zeros((4, 2)), "b": jnp.zeros(3)}], BATCHES, objective=objective)
