import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import losses
from tests.util import make_routing


def np_switch(ids, mask, probs, E):
    counts = np.zeros(E)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if mask[t, j]:
                counts[ids[t, j]] += 1
    f = counts / max(counts.sum(), 1)
    return E * np.sum(f * probs.mean(0))


def test_switch_balance_matches_numpy():
    r = make_routing(jax.random.key(0), 37, 6, 2, mask_prob=0.2)
    expected = np_switch(np.asarray(r.expert_ids), np.asarray(r.mask), np.asarray(r.probs), 6)
    np.testing.assert_allclose(losses.switch_balance_loss(r), expected, rtol=1e-6)


def test_switch_balance_extremes():
    T, E = 64, 4
    uniform_ids = (jnp.arange(T) % E)[:, None]
    r = make_routing(jax.random.key(0), T, E, 1, expert_ids=uniform_ids)
    r = r.replace(probs=jnp.full((T, E), 1.0 / E))
    np.testing.assert_allclose(losses.switch_balance_loss(r), 1.0, rtol=1e-6)
    collapsed = r.replace(expert_ids=jnp.zeros((T, 1), jnp.int32), probs=jax.nn.one_hot(jnp.zeros(T, int), E))
    np.testing.assert_allclose(losses.switch_balance_loss(collapsed), E, rtol=1e-6)


def test_z_loss_and_entropy_match_numpy():
    logits = np.asarray(jax.random.normal(jax.random.key(1), (9, 5))) * 3
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(losses.router_z_loss(jnp.asarray(logits)), np.mean(lse**2), rtol=1e-5)
    p = np.exp(logits - lse[:, None])
    np.testing.assert_allclose(losses.router_entropy(jnp.asarray(p)), np.mean(-(p * np.log(p)).sum(-1)), rtol=1e-5)
    onehot = jax.nn.one_hot(jnp.arange(3), 5)
    assert float(losses.router_entropy(onehot)) == 0.0


def test_max_violation():
    np.testing.assert_allclose(losses.max_violation(jnp.array([0.25, 0.25, 0.25, 0.25])), 0.0)
    np.testing.assert_allclose(losses.max_violation(jnp.array([0.5, 0.5, 0.0, 0.0])), 1.0)


def test_expert_counts_respects_mask():
    ids = jnp.array([[0, 1], [1, 2]])
    mask = jnp.array([[True, False], [True, True]])
    np.testing.assert_array_equal(losses.expert_counts(ids, mask, 3), [1, 1, 1])


# ---------------------------------------------------------------- configured balance losses

from jmoe import MoEConfig  # noqa: E402
from jmoe.losses import BalanceContext, balance_loss  # noqa: E402


def np_counts(ids, mask, C):
    c = np.zeros(C)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if mask[t, j]:
                c[ids[t, j]] += 1
    return c


def np_loss(name, ids, mask, probs, C, k, D=2):
    counts = np_counts(ids, mask, C)
    T = ids.shape[0]
    if name == "switch":
        return C * np.sum(counts / counts.sum() * probs.mean(0))
    if name == "switch_topk_any":
        return C * np.sum(counts / T * probs.mean(0))
    if name == "seq_aux":
        s = probs / probs.sum(-1, keepdims=True)
        return np.sum(C / (k * T) * counts * s.mean(0))
    if name == "device":
        f = C * counts / counts.sum()
        P = probs.mean(0)
        return np.sum(f.reshape(D, -1).mean(1) * P.reshape(D, -1).sum(1))


@pytest.mark.parametrize("name", ["switch", "switch_topk_any", "seq_aux", "device"])
@pytest.mark.parametrize("scope", ["global", "micro", "sequence"])
def test_balance_losses_match_numpy(name, scope):
    B, S, E, k = 3, 7, 6, 2
    r = make_routing(jax.random.key(1), B * S, E, k)
    cfg = MoEConfig(num_experts=E, top_k=k, d_model=4, d_ff=4, balance_loss=name, balance_scope=scope,
                    balance_options=dict(devices=2) if name == "device" else None)
    got = balance_loss(r, cfg, BalanceContext(seq_len=S))
    ids, mask, probs = (np.asarray(a) for a in (r.expert_ids, r.mask, r.probs))
    if scope == "sequence" or name == "seq_aux":
        want = np.mean([np_loss(name, ids[b * S:(b + 1) * S], mask[b * S:(b + 1) * S], probs[b * S:(b + 1) * S], E, k)
                        for b in range(B)])
    else:  # one shard: global and micro coincide
        want = np_loss(name, ids, mask, probs, E, k)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_global_counts_replace_local_ones():
    r = make_routing(jax.random.key(2), 10, 4, 1)
    cfg = MoEConfig(num_experts=4, top_k=1, d_model=4, d_ff=4)
    counts = jnp.array([1.0, 1.0, 1.0, 7.0])
    got = balance_loss(r, cfg, BalanceContext(seq_len=10, global_counts=counts))
    np.testing.assert_allclose(got, 4 * np.sum(np.asarray(counts) / 10 * np.asarray(r.probs).mean(0)), rtol=1e-6)


def test_uniform_routing_gives_one():
    T, E = 16, 4
    ids = (jnp.arange(T) % E)[:, None]
    r = make_routing(jax.random.key(0), T, E, 1, expert_ids=ids).replace(probs=jnp.full((T, E), 0.25))
    for name in ["switch", "seq_aux", "device"]:
        cfg = MoEConfig(num_experts=E, top_k=1, d_model=4, d_ff=4, balance_loss=name,
                        balance_options=dict(devices=2) if name == "device" else None)
        np.testing.assert_allclose(balance_loss(r, cfg, BalanceContext(seq_len=T)), 1.0, rtol=1e-6)


def test_selection_bias_update_checks_its_shapes():
    np.testing.assert_array_equal(losses.update_selection_bias(jnp.zeros(3), jnp.array([3, 1, 2]), 0.5), [-0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="bias and tokens_per_expert"):
        losses.update_selection_bias(jnp.zeros(4), jnp.ones(5), 0.1)
