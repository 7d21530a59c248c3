"""Compressed experts (`jmoe.dispatch.compressed`) against a per-token reference written from
the formula: forward and gradients, both implementations, masked slots, one hot expert; the
engine keeps the dispatch; the paths that cannot run it refuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig, init_moe, moe_layer
from jmoe.experts import ACTIVATIONS

D, F, E = 8, 12, 5


def cfg_for(k=3, n=1, impl="xla", activation="swiglu", router="topk", **kw):
    return MoEConfig(num_experts=E, top_k=k, d_model=D, d_ff=F, activation=activation, router=router,
                     dispatch="compressed", dispatch_options={"num_compressed": n, "impl": impl, "block_size": 8}, **kw)


def random_params(cfg, seed=0):
    p = init_moe(jax.random.key(seed), cfg)
    keys = jax.random.split(jax.random.key(seed + 100), 3)
    for key, name in zip(keys, ("ce_gate", "ce_up", "ce_hidden")):
        if name in p["experts"]:
            p["experts"][name] = 1.0 + 0.5 * jax.random.normal(key, p["experts"][name].shape)
    return p


def reference(params, x, routing, cfg):
    """Token by token: sort the token's slots by weight, mix the last n experts' vectors, run
    the first k - n experts on the scaled inputs."""
    ex, n, k = params["experts"], cfg.dispatch_options.num_compressed, cfg.top_k
    act = ACTIVATIONS.get(cfg.activation)
    ys = []
    for t in range(x.shape[0]):
        w = jnp.where(routing.mask[t], routing.weights[t], 0.0)
        order = np.argsort(-np.asarray(w), kind="stable")
        main, aux = order[: k - n], order[k - n:]
        aux_w = w[aux]
        a = aux_w / aux_w.sum() if float(aux_w.sum()) > 0 else jnp.zeros_like(aux_w)
        ids_aux = routing.expert_ids[t][aux]
        theta = {name: (a @ ex[name][ids_aux]) if float(aux_w.sum()) > 0 else jnp.ones(ex[name].shape[1:])
                 for name in ("ce_gate", "ce_up", "ce_hidden") if name in ex}
        y = jnp.zeros((D,))
        for s in main:
            if not bool(routing.mask[t][s]):
                continue
            e = int(routing.expert_ids[t][s])
            up = (x[t] * theta["ce_up"]) @ ex["w_up"][e]
            h = act.fn((x[t] * theta["ce_gate"]) @ ex["w_gate"][e]) * up if act.gated else act.fn(up)
            y = y + w[s] * ((h * theta["ce_hidden"]) @ ex["w_down"][e])
        ys.append(y)
    return jnp.stack(ys)


def test_the_serving_layout_equals_the_stacked_one():
    from jmoe.experts import ExpertList

    for impl in ("xla", "ragged_dot"):
        cfg = cfg_for(3, 1, impl)
        params = random_params(cfg)
        x = jax.random.normal(jax.random.key(5), (6, D))
        y, _ = moe_layer(params, x, cfg)
        split, _ = moe_layer(dict(params, experts=ExpertList.split(params["experts"])), x, cfg)
        np.testing.assert_allclose(split, y, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "ragged_dot"])
@pytest.mark.parametrize("k, n, activation", [(3, 1, "swiglu"), (3, 2, "swiglu"), (2, 1, "gelu")])
def test_forward_and_gradients_equal_the_reference(impl, k, n, activation):
    cfg = cfg_for(k, n, impl, activation)
    params = random_params(cfg)
    x = jax.random.normal(jax.random.key(1), (7, D))
    y, aux = moe_layer(params, x, cfg)
    np.testing.assert_allclose(y, reference(params, x, aux.routing, cfg), atol=2e-5)

    # gradients with the routing held fixed (the router's own gradient is the usual one)
    routing = aux.routing
    from jmoe.dispatch.compressed import compressed_dispatch

    def fast(experts, x):
        return jnp.sum(jnp.sin(compressed_dispatch(experts, x, routing, cfg)[0]))

    def ref(experts, x):
        return jnp.sum(jnp.sin(reference(dict(params, experts=experts), x, routing, cfg)))

    g_fast = jax.grad(fast, argnums=(0, 1))(params["experts"], x)
    g_ref = jax.grad(ref, argnums=(0, 1))(params["experts"], x)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=5e-5)
    assert float(jnp.abs(g_fast[0]["ce_up"]).sum()) > 0  # the vectors learn


def test_ones_vectors_drop_the_lowest_experts():
    """Fresh vectors (ones) compute the first k - n experts with their own weights."""
    cfg = cfg_for(3, 1)
    params = init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(2), (9, D))
    y, aux = moe_layer(params, x, cfg)
    plain = MoEConfig(num_experts=E, top_k=3, d_model=D, d_ff=F, dispatch="dense")
    r = aux.routing
    dropped = r.replace(weights=r.weights.at[:, 2].set(0.0), mask=r.mask.at[:, 2].set(False))
    from jmoe.dispatch.reference import dense_dispatch

    want, _ = dense_dispatch({k: v for k, v in params["experts"].items() if not k.startswith("ce_")}, x, dropped, plain)
    np.testing.assert_allclose(y, want, atol=2e-5)
    assert float(aux.experts_per_token) == 2.0  # the compressed expert is not computed


def test_experts_per_token_counts_the_computed_slots_of_masked_routings():
    cfg = cfg_for(3, 1, router="top_p", router_options={"threshold": 0.3})
    x = jax.random.normal(jax.random.key(3), (11, D))
    _, aux = moe_layer(random_params(cfg), x, cfg)
    r = aux.routing
    w = np.where(r.mask, r.weights, 0.0)
    main = np.take_along_axis(np.asarray(r.mask), np.argsort(-w, axis=-1, kind="stable"), axis=-1)[:, :2]
    np.testing.assert_allclose(float(aux.experts_per_token), main.sum() / 11, rtol=1e-6)


def test_masked_slots_and_one_hot_expert():
    """A dynamic-k router leaves slots unselected (top-p); a token with no compressed slot
    keeps its inputs unscaled; every token on one expert."""
    cfg = cfg_for(3, 1, router="top_p", router_options={"threshold": 0.3})
    params = random_params(cfg)
    x = jax.random.normal(jax.random.key(3), (11, D))
    y, aux = moe_layer(params, x, cfg)
    assert not bool(aux.routing.mask.all())  # some tokens use fewer than 3 experts
    np.testing.assert_allclose(y, reference(params, x, aux.routing, cfg), atol=2e-5)

    cfg = cfg_for(2, 1)
    params = random_params(cfg, seed=1)
    params["router"]["w"] = jnp.zeros_like(params["router"]["w"]).at[:, 3].set(50.0)
    x = jnp.abs(jax.random.normal(jax.random.key(4), (6, D)))
    y, aux = moe_layer(params, x, cfg)
    assert bool((aux.routing.expert_ids[:, 0] == 3).all())
    np.testing.assert_allclose(y, reference(params, x, aux.routing, cfg), atol=2e-5)


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="num_compressed=2 must be below top_k=2"):
        cfg_for(2, 2)
    with pytest.raises(ValueError, match="impl"):
        cfg_for(3, 1, impl="pallas")
    cfg = cfg_for(3, 1)
    params = init_moe(jax.random.key(0), cfg)
    del params["experts"]["ce_up"]
    with pytest.raises(ValueError, match="ce_up"):
        moe_layer(params, jnp.zeros((2, D)), cfg)


def test_decoding_keeps_the_dispatch_and_offloading_refuses():
    from jmoe.infer.forward import serving_moe
    from jmoe.infer.offload import OffloadedLM
    from jmoe.nn import LMConfig, init_lm

    moe = cfg_for(2, 1).with_options("compressed", block_size=512)
    decode = serving_moe(moe, 1)
    assert decode.dispatch == "compressed" and decode.dispatch_options.block_size < 512
    assert serving_moe(moe, 4096, split=True) is moe
    lm = LMConfig(vocab_size=32, d_model=D, n_layers=2, n_heads=2, d_ff=16, max_seq_len=16, moe=moe)
    with pytest.raises(ValueError, match="compressed"):
        OffloadedLM(lm, init_lm(jax.random.key(0), lm), cache_size=2)
