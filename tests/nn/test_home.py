"""HoME and MMoE (`jmoe.nn.home`): MMoE equals its formula; HoME's hierarchy mask keeps a
task's output free of other categories' and tasks' experts; feature gates start as the
identity; ReLU experts go silent where normalised Swish ones do not; bad input is named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.nn.home import HoMEConfig, home_apply, home_task_apply, init_home

CATS = (0, 0, 1)  # tasks 0 and 1 in category 0, task 2 in category 1
X = jax.random.normal(jax.random.key(0), (10, 8))
TASKS = jnp.asarray([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
HOME = HoMEConfig(categories=CATS, d_in=8, d_out=5, hidden=6, shared_experts=2, category_experts=1, task_experts=1,
                  feature_gate_rank=3)


def test_mmoe_is_its_formula():
    cfg = HoMEConfig.mmoe(CATS, d_in=8, d_out=5, hidden=6, num_experts=3)
    p = init_home(jax.random.key(1), cfg)
    y, stats = home_apply(p, X, TASKS, cfg)
    for i in range(10):
        t = int(TASKS[i])
        gate = jax.nn.softmax(X[i] @ p["gates"]["task"][t])
        mix = sum(gate[e] * jax.nn.relu(X[i] @ p["experts"]["w"][e] + p["experts"]["b"][e]) for e in range(3))
        np.testing.assert_allclose(y[i], mix @ p["towers"]["w"][t] + p["towers"]["b"][t], rtol=1e-5, atol=1e-6)
    assert stats["gates"].shape == (3, 3) and np.allclose(np.sum(stats["gates"], -1), 1.0)


NOISE = jax.random.normal(jax.random.key(9), (8, 6))  # a change the experts' normalisation cannot undo


def test_the_hierarchy_mask_keeps_other_categories_and_tasks_out():
    p = init_home(jax.random.key(2), HOME)
    y, _ = home_apply(p, X, TASKS, HOME)
    other_cat = jax.tree.map(lambda a: a, p)
    # category 1's task-level expert (row 1 of the stack); its meta-level expert reaches
    # category 0 only through the shared gate's z_s, as in HoME
    other_cat["task"]["category"]["w"] = other_cat["task"]["category"]["w"].at[1].add(NOISE[:6])
    y2, _ = home_apply(other_cat, X, TASKS, HOME)
    cat0 = np.asarray(TASKS) < 2
    np.testing.assert_allclose(y2[cat0], y[cat0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(y2[~cat0], y[~cat0])
    other_task = jax.tree.map(lambda a: a, p)
    other_task["task"]["task"]["w"] = other_task["task"]["task"]["w"].at[1].add(NOISE[:6])  # task 1's own expert
    y3, _ = home_apply(other_task, X, TASKS, HOME)
    np.testing.assert_allclose(y3[np.asarray(TASKS) != 1], y[np.asarray(TASKS) != 1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(y3[np.asarray(TASKS) == 1], y[np.asarray(TASKS) == 1])


def test_feature_gates_start_as_the_identity_and_everything_trains():
    p = init_home(jax.random.key(3), HOME)
    plain = HOME.replace(feature_gate_rank=0)
    stripped = jax.tree.map(lambda a: a, p)
    for level in ("meta", "task"):
        for stack in stripped[level].values():
            del stack["fg_a"], stack["fg_b"]
    np.testing.assert_allclose(home_apply(p, X, TASKS, HOME)[0], home_apply(stripped, X, TASKS, plain)[0], rtol=1e-5)
    grads = jax.jit(jax.grad(lambda q: jnp.sum(home_apply(q, X, TASKS, HOME)[0] ** 2)))(p)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["meta"]["shared"]["fg_b"]).max()) > 0  # the gates can move


def test_relu_experts_go_silent_where_normalised_swish_ones_do_not():
    mmoe = HoMEConfig.mmoe(CATS, d_in=8, d_out=5, hidden=6, num_experts=3)
    assert float(home_apply(init_home(jax.random.key(4), mmoe), X, TASKS, mmoe)[1]["zero_share"]) > 0.2
    assert float(home_apply(init_home(jax.random.key(4), HOME), X, TASKS, HOME)[1]["zero_share"]) == 0.0


@pytest.mark.parametrize("cfg", [HOME, HOME.replace(category_experts=0, task_experts=2),
                                 HoMEConfig.mmoe(CATS, d_in=8, d_out=5, hidden=6, num_experts=3)])
def test_one_task_equals_its_rows_of_every_task(cfg):
    p = init_home(jax.random.key(5), cfg)
    for t in range(3):
        y, _ = home_apply(p, X, jnp.full((10,), t), cfg)
        np.testing.assert_allclose(home_task_apply(p, X, t, cfg), y, rtol=1e-5, atol=1e-6)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="every category index"):
        HoMEConfig(categories=(0, 2))
    with pytest.raises(ValueError, match="categories"):
        HoMEConfig(categories=())
    with pytest.raises(ValueError, match="self_gate needs task_experts"):
        HoMEConfig(task_experts=0)
    p = init_home(jax.random.key(0), HOME)
    with pytest.raises(ValueError, match=r"x must be \[N, d_in=8\]"):
        home_apply(p, X[:, :4], TASKS, HOME)
    with pytest.raises(ValueError, match="task_ids must be"):
        home_apply(p, X, TASKS[:3], HOME)
    with pytest.raises(ValueError, match=r"task=3 must be a task index in \[0, 3\)"):
        home_task_apply(p, X, 3, HOME)
