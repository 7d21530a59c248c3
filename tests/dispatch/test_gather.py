"""The gather dispatch equals the run-every-expert reference, forward and gradient; the
decode-time choice between gather and dropless."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe import MoEConfig
from jmoe.dispatch import get_dispatch
from jmoe.dispatch.gather import GATHER_MAX_SLOTS_PER_EXPERT, decode_dispatch
from jmoe.experts import expected_expert_shapes
from jmoe.routing import Routing
from tests.util import tree_allclose

D, F = 6, 10


def random_routing(seed, T, E, k, *, mask_prob=0.0, expert_ids=None):
    """Like tests.util.make_routing (k distinct experts per token, weights 0 where masked),
    built with NumPy so that each new shape costs no compilation."""
    rng = np.random.default_rng(seed)
    if expert_ids is None:
        expert_ids = np.argsort(rng.uniform(size=(T, E)), axis=-1)[:, :k]
    mask = rng.uniform(size=(T, k)) >= mask_prob
    weights = np.where(mask, rng.uniform(0.1, 1.0, size=(T, k)), 0.0)
    logits = rng.normal(size=(T, E))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return Routing(expert_ids=jnp.asarray(expert_ids, jnp.int32), weights=f32(weights), probs=f32(probs),
                   logits=f32(logits), mask=jnp.asarray(mask))


def random_experts(seed, cfg):
    """Expert params of `cfg`'s shapes (fan-in scaled normal), built with NumPy."""
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[1]), jnp.float32)
            for name, shape in sorted(expected_expert_shapes(cfg).items())}


def outputs_and_grads(cases, grads):
    """For each (cfg, params, x, routing, probe) case: {dispatch: (y, d<y, probe>/d(params, x,
    weights) or None)} of "dense" and "gather". All cases run in one compiled call."""

    def one(cfg, params, x, routing, probe):
        def f(name, params, x, weights):
            y, _ = get_dispatch(name)(params, x, routing.replace(weights=weights), cfg)
            return jnp.sum(y.astype(jnp.float32) * probe), y

        out = {}
        for name in ("dense", "gather"):
            if grads:
                (_, y), g = jax.value_and_grad(partial(f, name), argnums=(0, 1, 2), has_aux=True)(
                    params, x, routing.weights
                )
                out[name] = (y, g)
            else:
                out[name] = (f(name, params, x, routing.weights)[1], None)
        return out

    cfgs = [c[0] for c in cases]
    run = jax.jit(lambda arrays: [one(cfg, *a) for cfg, a in zip(cfgs, arrays)])
    return run([c[1:] for c in cases])


def check_against_reference(cases, grads=True, rtol=2e-5, atol=2e-5, grad_tol=1e-4):
    """cases: (cfg, routing, seed) triples; gather equals dense on each, forward and (with
    `grads`) gradient w.r.t. the expert params, x and the routing weights."""
    prepared = []
    for cfg, routing, seed in cases:
        rng = np.random.default_rng(seed)
        T = routing.num_tokens
        x = jnp.asarray(rng.normal(size=(T, cfg.d_model)), jnp.float32)
        probe = jnp.asarray(rng.normal(size=(T, cfg.d_model)), jnp.float32)
        prepared.append((cfg, random_experts(seed, cfg), x, routing, probe))
    for (cfg, routing, seed), out in zip(cases, outputs_and_grads(prepared, grads)):
        (ref_y, ref_grads), (y, g) = out["dense"], out["gather"]
        msg = f"T={routing.num_tokens} k={cfg.top_k} E={cfg.num_experts}"
        assert y.shape == ref_y.shape and y.dtype == ref_y.dtype, msg
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref_y, np.float32), rtol=rtol, atol=atol,
                                   err_msg=msg)
        if grads:
            tree_allclose(g, ref_grads, rtol=grad_tol, atol=grad_tol)


def grid_case(T, k, E, **routing_kw):
    cfg = MoEConfig(num_experts=E, top_k=k, d_model=D, d_ff=F)
    return cfg, random_routing(T * 100 + E, T, E, k, **routing_kw), T + k


def test_gather_matches_reference_on_the_grid():
    """Forward: every T in {1, 2, 5, 16} with every k in {1, 2, 6} and every E in {1, 4, 64}
    (the (k, E) pairs (1, 1), (2, 4), (6, 64)), and the other pairs with k <= E at one T."""
    grid = [(T, k, E) for T in (1, 2, 5, 16) for k, E in [(1, 1), (2, 4), (6, 64)]]
    grid += [(1, 1, 64), (5, 1, 4), (16, 2, 64)]
    check_against_reference([grid_case(*c) for c in grid], grads=False)


def test_gather_gradients_match_reference():
    """Gradients on cases that take every value of the grid's k and E."""
    check_against_reference([grid_case(*c) for c in [(1, 1, 1), (5, 6, 64), (16, 2, 4)]])


def test_masked_slots_contribute_nothing():
    E, k = 8, 3
    cfg = MoEConfig(num_experts=E, top_k=k, d_model=D, d_ff=F)
    check_against_reference([(cfg, random_routing(13, 13, E, k, mask_prob=0.4), 0),
                             (cfg, random_routing(1, 1, E, k, mask_prob=0.4), 1)])


def test_masked_slots_read_no_weights():
    # NaN in the experts only masked slots choose changes nothing; a fully masked routing gives 0
    T, E, k = 5, 8, 3
    cfg = MoEConfig(num_experts=E, top_k=k, d_model=D, d_ff=F)
    mask = np.tile([[True, False, False]], (T, 1))
    routing = random_routing(0, T, E, k, expert_ids=np.tile([[1, 5, 6]], (T, 1)))
    routing = routing.replace(mask=jnp.asarray(mask), weights=jnp.where(mask, routing.weights, 0.0))
    params = random_experts(7, cfg)
    poisoned = jax.tree.map(lambda w: w.at[5].set(jnp.nan).at[6].set(jnp.nan), params)
    none = routing.replace(mask=jnp.zeros_like(routing.mask), weights=jnp.zeros_like(routing.weights))
    x = jnp.asarray(np.random.default_rng(8).normal(size=(T, D)), jnp.float32)

    @jax.jit
    def run(params, poisoned, x):
        gather, dense = get_dispatch("gather"), get_dispatch("dense")
        return gather(poisoned, x, routing, cfg), dense(params, x, routing, cfg)[0], gather(params, x, none, cfg)[0]

    (y, dropped), ref, y_none = run(params, poisoned, x)
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)
    assert dropped.dtype == jnp.float32 and float(dropped) == 0.0
    np.testing.assert_array_equal(y_none, 0.0)


def test_all_tokens_to_one_expert():
    E, T = 8, 11
    cfg = MoEConfig(num_experts=E, top_k=1, d_model=D, d_ff=F)
    check_against_reference([(cfg, random_routing(0, T, E, 1, expert_ids=np.full((T, 1), 5)), 0)])


def test_gelu_experts():
    cfg = MoEConfig(num_experts=5, top_k=2, d_model=D, d_ff=F, activation="gelu")
    check_against_reference([(cfg, random_routing(3, 7, 5, 2, mask_prob=0.2), 0)])


def test_bfloat16_compute_dtype():
    cfg = MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=16, dtype="bfloat16")
    routing = random_routing(0, 9, 4, 2)
    check_against_reference([(cfg, routing, 0)], rtol=5e-2, atol=5e-2, grad_tol=5e-2)
    y, _ = jax.eval_shape(partial(get_dispatch("gather"), cfg=cfg), random_experts(1, cfg), jnp.ones((9, 8)), routing)
    assert y.dtype == jnp.bfloat16


LAYER_CASES = {
    "topk": dict(router="topk"),
    "sigmoid_bias": dict(router="sigmoid_bias"),
    "top_p": dict(router="top_p", top_k=4, router_options=dict(threshold=0.5)),
    "null_experts": dict(router="null_experts", router_options=dict(num_null_experts=4)),
    "moepp": dict(router="moepp", router_options=dict(num_zero_experts=1, num_copy_experts=1, num_constant_experts=1)),
}


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layer_with_gather_equals_dropless(name):
    """A decoding step (6 sequences, 1 token each) through the whole layer; gradients for topk."""
    cfg = MoEConfig(num_experts=6, top_k=2, d_model=8, d_ff=12, num_shared_experts=1, d_ff_shared=4)
    cfg = cfg.replace(**LAYER_CASES[name])
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda key: jmoe.init_moe(key, cfg), jax.random.key(0))  # no compilation
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(s.shape[-2] if s.ndim > 1 else 4),
                                                s.dtype), shapes)
    state = jmoe.layer.init_moe_state(cfg)
    x = 3 * jnp.asarray(rng.normal(size=(6, 1, cfg.d_model)), jnp.float32)
    configs = {
        "dropless": cfg.replace(dispatch="dropless", dispatch_options=dict(block_size=8)),
        "gather": cfg.replace(dispatch="gather"),
    }
    grads = name == "topk"

    def loss(c, params, x):
        y, aux = jmoe.moe_layer(params, x, c, state=state)
        return jnp.sum(jnp.sin(y)) + aux.loss, (y, aux)

    @jax.jit
    def both(params, x):
        if grads:
            return {n: jax.value_and_grad(partial(loss, c), argnums=(0, 1), has_aux=True)(params, x)
                    for n, c in configs.items()}
        return {n: (loss(c, params, x), None) for n, c in configs.items()}

    out = both(params, x)
    (_, (y_ref, aux_ref)), g_ref = out["dropless"]
    (_, (y, aux)), g = out["gather"]
    assert y.shape == x.shape
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(aux.loss, aux_ref.loss, rtol=1e-6)
    assert float(aux.dropped_fraction) == 0.0
    if name in ("top_p", "null_experts", "moepp"):  # some slots are masked or FLOP-free
        assert not np.asarray(aux.routing.ffn_mask(cfg.num_ffn_choices)).all()
    if grads:
        tree_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_decode_dispatch_rule():
    c = GATHER_MAX_SLOTS_PER_EXPERT
    assert decode_dispatch(1, 2, 8) == "gather"
    assert decode_dispatch(1, 8, 256) == "gather"
    assert decode_dispatch(32, 6, 64) == "dropless"
    assert decode_dispatch(4096, 2, 8) == "dropless"
    assert decode_dispatch(int(c * 64) // 2, 2, 64) == "gather"  # T*k = c*E: the last gather shape
    assert decode_dispatch(int(c * 64) // 2 + 1, 2, 64) == "dropless"
    assert decode_dispatch(np.int64(1), 2, 8) == "gather"
    for args in [(0, 2, 8), (1, 0, 8), (1, 2, -1), (1.0, 2, 8), (True, 2, 8), (1, 2, "8")]:
        with pytest.raises(ValueError, match="positive int"):
            decode_dispatch(*args)
    for name in ("gather", "dropless"):
        MoEConfig(num_experts=8, top_k=2, dispatch=name)  # both are registered dispatches


def test_bad_shapes_are_refused():
    cfg = MoEConfig(num_experts=4, top_k=2, d_model=D, d_ff=F)
    params = random_experts(0, cfg)
    routing = random_routing(1, 5, 4, 2)
    gather = get_dispatch("gather")
    with pytest.raises(ValueError, match=r"x must be \[T, d\]"):
        gather(params, jnp.ones((1, 5, D)), routing, cfg)
    with pytest.raises(ValueError, match="expert_ids must be"):
        gather(params, jnp.ones((4, D)), routing, cfg)
    with pytest.raises(ValueError, match="w_up"):
        gather(params, jnp.ones((5, D + 1)), routing, cfg)
