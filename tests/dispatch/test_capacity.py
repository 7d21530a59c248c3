import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from jmoe import MoEConfig
from jmoe.dispatch import capacity_assignment, expert_capacity, get_dispatch
from tests.util import init_experts, make_routing


def loop_assignment(ids, mask, E, C):
    """The priority rule written out: choice 0 of every token, then choice 1, ..."""
    T, k = ids.shape
    fill = [0] * E
    keep = np.zeros((T, k), bool)
    pos = np.zeros((T, k), int)
    for j in range(k):
        for t in range(T):
            if not mask[t, j]:
                continue
            e = ids[t, j]
            pos[t, j] = fill[e]
            keep[t, j] = fill[e] < C
            fill[e] += 1
    return pos, keep


def test_expert_capacity():
    assert expert_capacity(100, 2, 8, 1.25) == math.ceil(1.25 * 100 * 2 / 8) == 32
    assert expert_capacity(1, 1, 64, 0.1) == 1
    for args, name in [((16, 2, 4, 0.0), "capacity_factor"), ((16, 2, 4, -1.0), "capacity_factor"),
                       ((16, 2, 0, 1.0), "num_experts"), ((16, 0, 4, 1.0), "top_k"), ((-1, 2, 4, 1.0), "num_tokens")]:
        with pytest.raises(ValueError, match=name):
            expert_capacity(*args)


@given(
    E=st.integers(1, 12),
    k_frac=st.floats(0, 1),
    T=st.integers(1, 40),
    C=st.integers(1, 6),
    mask_prob=st.sampled_from([0.0, 0.25]),
    seed=st.integers(0, 1000),
)
def test_assignment_matches_loop(E, k_frac, T, C, mask_prob, seed):
    k = 1 + int(k_frac * (min(E, 4) - 1))
    r = make_routing(jax.random.key(seed), T, E, k, mask_prob=mask_prob)
    pos, keep = capacity_assignment(r.expert_ids, r.mask, E, C)
    epos, ekeep = loop_assignment(np.asarray(r.expert_ids), np.asarray(r.mask), E, C)
    np.testing.assert_array_equal(keep, ekeep)
    np.testing.assert_array_equal(np.where(ekeep, pos, 0), np.where(ekeep, epos, 0))


def _setup(E=6, k=2, T=30, seed=0, d=8, f=12, capacity_factor=1.25):
    cfg = MoEConfig(num_experts=E, top_k=k, d_model=d, d_ff=f, dispatch="capacity",
                    dispatch_options=dict(capacity_factor=capacity_factor))
    r = make_routing(jax.random.key(seed), T, E, k)
    params = init_experts(jax.random.key(seed + 1), cfg)
    x = jax.random.normal(jax.random.key(seed + 2), (T, d))
    return cfg, r, params, x


def test_large_capacity_equals_dropless_forward_and_gradient():
    cfg, r, params, x = _setup()
    big = cfg.replace(dispatch_options=dict(capacity_factor=float(cfg.num_experts)))  # C >= T: nothing can drop
    dropless = cfg.replace(dispatch="dropless", dispatch_options=dict(block_size=8))

    def f(name, c):
        def loss(p, x, w):
            y, dropped = get_dispatch(name)(p, x, r.replace(weights=w), c)
            return jnp.sum(jnp.sin(y)), (y, dropped)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, x, r.weights)

    (_, (y_cap, dropped)), g_cap = f("capacity", big)
    (_, (y_dl, _)), g_dl = f("dropless", dropless)
    assert float(dropped) == 0.0
    np.testing.assert_allclose(y_cap, y_dl, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_cap), jax.tree.leaves(g_dl)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0])
def test_small_capacity_drops_exactly_the_predicted_slots(factor):
    cfg, r, params, x = _setup(E=4, k=2, T=40, capacity_factor=factor)
    C = expert_capacity(40, 2, 4, factor)
    _, keep = loop_assignment(np.asarray(r.expert_ids), np.asarray(r.mask), 4, C)
    y, dropped = jax.jit(lambda p, x: get_dispatch("capacity")(p, x, r, cfg))(params, x)
    assert int(dropped) == int((~keep).sum()) > 0
    # the kept slots alone, through the dense reference, give the same output
    kept = r.replace(weights=jnp.where(jnp.asarray(keep), r.weights, 0.0))
    ref, _ = get_dispatch("dense")(params, x, kept, cfg)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # deterministic
    y2, _ = jax.jit(lambda p, x: get_dispatch("capacity")(p, x, r, cfg))(params, x)
    np.testing.assert_array_equal(y, y2)


def test_first_choice_beats_second_choice():
    # token 0's second choice and token 1's first choice both want expert 0, C = 1:
    # the first choice of token 1 wins even though token 0 comes first.
    ids = jnp.array([[1, 0], [0, 1]])
    pos, keep = capacity_assignment(ids, jnp.ones((2, 2), bool), 2, 1)
    np.testing.assert_array_equal(keep, [[True, False], [True, False]])
