"""Experts held in their slots (`jmoe.train.rebalance`): the layout changes between per expert and
per slot, re-placements move weights and Adam moments, and the gradient-norm clip counts each
expert once."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jmoe
from jmoe.nn import LMConfig
from jmoe.train import TrainConfig
from jmoe.train import rebalance
from jmoe.train.state import clip_by_global_norm, global_norm, init_train_state, make_optimizer
from tests.util import tree_allclose

MODEL = LMConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16,
                 moe=jmoe.MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8))
SLOTS = {0: np.array([0, 1, 2, 3, 0, 0]), 1: np.array([3, 2, 1, 0, 1, 2])}


def state_with_slots(seed=0):
    """A train state (per expert) with an Adam state that is not zero, and a placement per layer."""
    tc = TrainConfig(steps=4)
    tx, _ = make_optimizer(tc)
    state = init_train_state(MODEL, tc, tx)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(seed), p.shape), state["params"])
    _, state["opt_state"] = tx.update(grads, state["opt_state"], state["params"])
    state["router_state"] = {f"placement/{i}": jnp.asarray(s, jnp.int32) for i, s in SLOTS.items()}
    return state


def experts(tree, i):
    return tree["layers"][str(i)]["moe"]["experts"]


def test_to_slots_copies_each_expert_into_its_slots_and_to_experts_reads_them_back():
    state = state_with_slots()
    held = rebalance.to_slots(state)
    for i, s in SLOTS.items():
        for name, w in experts(held["params"], i).items():
            assert w.shape[0] == len(s)
            np.testing.assert_array_equal(w, experts(state["params"], i)[name][s])
        mu = experts(held["opt_state"][1][0].mu, i)["w_up"]
        np.testing.assert_array_equal(mu, experts(state["opt_state"][1][0].mu, i)["w_up"][s])
    np.testing.assert_array_equal(held["params"]["embed"]["w"], state["params"]["embed"]["w"])  # only experts
    back = rebalance.to_experts(held, MODEL)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    tree_allclose(back, state, rtol=0, atol=0)


def test_a_state_without_a_placement_is_left_alone():
    state = state_with_slots()
    state["router_state"] = {}
    assert rebalance.to_slots(state) is state and rebalance.to_experts(state, MODEL) is state


def test_a_re_placement_moves_weights_and_adam_moments_into_the_new_slots():
    state = rebalance.to_slots(state_with_slots())
    new = {0: np.array([3, 0, 1, 2, 0, 3]), 1: np.array([0, 1, 2, 3, 0, 1])}
    sources = {i: rebalance.move_sources(SLOTS[i], new[i]) for i in SLOTS}
    np.testing.assert_array_equal(sources[0], [3, 0, 1, 2, 0, 3])
    np.testing.assert_array_equal(sources[1], [3, 2, 1, 0, 3, 2])  # first old copy of each expert
    state["router_state"] = {f"placement/{i}": jnp.asarray(s, jnp.int32) for i, s in new.items()}
    moved = rebalance.moved(state, sources)
    per_expert = state_with_slots()  # what each expert's rows hold
    for i, s in new.items():
        np.testing.assert_array_equal(experts(moved["params"], i)["w_gate"],
                                      experts(per_expert["params"], i)["w_gate"][s])
        np.testing.assert_array_equal(experts(moved["opt_state"][1][0].nu, i)["w_down"],
                                      experts(per_expert["opt_state"][1][0].nu, i)["w_down"][s])


def test_the_clip_counts_each_expert_once_whatever_its_copies():
    state = state_with_slots()
    grads = jax.tree.map(lambda p: 3.0 * jax.random.normal(jax.random.key(1), p.shape), state["params"])
    held = rebalance.to_slots({"params": grads, "router_state": state["router_state"]})["params"]
    weights = rebalance.copy_weights(held, state["router_state"])
    np.testing.assert_allclose(global_norm(held, weights), optax.tree.norm(grads), rtol=1e-6)
    assert float(optax.tree.norm(held)) > float(optax.tree.norm(grads)) * 1.05  # unweighted, copies count again
    clip = clip_by_global_norm(1.0)
    ours, _ = clip.update(held, clip.init(held), norm_weights=weights)
    ref, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    tree_allclose(ours, rebalance.to_slots({"params": ref, "router_state": state["router_state"]})["params"],
                  rtol=1e-6, atol=1e-7)
    plain, _ = clip.update(grads, clip.init(grads))  # without weights: optax's clip
    tree_allclose(plain, ref, rtol=0, atol=0)
