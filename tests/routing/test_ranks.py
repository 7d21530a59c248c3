"""Rank routing (`jmoe.routing.ranks`, self-contrast decoding's weak routing) against a loop
over tokens, its checks, and the routing-edit slot of `MoEConfig`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig
from jmoe.layer import route
from jmoe.routing.ranks import keep_ranks
from tests.util import make_routing


def _reference(routing, ranks):
    ids, w, m = (np.asarray(x) for x in (routing.expert_ids, routing.weights, routing.mask))
    keep, out = np.zeros_like(m), np.zeros_like(w)
    for t in range(len(w)):
        sel = [s for s in np.argsort(-np.where(m[t], w[t], -np.inf), kind="stable") if m[t, s]]
        kept = [s for r, s in enumerate(sel) if r in ranks]
        total, part = w[t][m[t]].sum(), sum(w[t, s] for s in kept)
        for s in kept:
            keep[t, s], out[t, s] = True, w[t, s] * total / part
    return keep, out


@pytest.mark.parametrize("ranks", [(0,), (1,), (2, 0), (3,)])
@pytest.mark.parametrize("mask_prob", [0.0, 0.3])
def test_keep_ranks_equals_a_loop_over_tokens(ranks, mask_prob):
    routing = make_routing(jax.random.key(len(ranks)), 12, 6, 4, mask_prob=mask_prob)
    got = keep_ranks(routing, ranks)
    keep, w = _reference(routing, ranks)
    np.testing.assert_array_equal(np.asarray(got.mask), keep)
    np.testing.assert_allclose(np.asarray(got.weights), w, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got.probs, routing.probs)  # the router's probabilities are untouched


def test_rank_routing_through_the_layer_is_top1_for_rank_0():
    # a router whose weights sum to one (Mixtral's): rank 0 of the top 3 is top-1 routing
    cfg = MoEConfig(num_experts=6, top_k=3, d_model=8, d_ff=4, router_options={"renormalize": True})
    from jmoe.layer import init_moe

    params = init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (10, 8))
    weak, _ = route(params["router"], x, cfg.replace(routing_edit="ranks", routing_edit_options={"ranks": [0]}))
    top1, _ = route(params["router"], x, cfg.replace(top_k=1))
    dense = lambda r: np.asarray(r.combine_weights(6))
    np.testing.assert_allclose(dense(weak), dense(top1), atol=1e-6)  # the top expert with all the weight


@pytest.mark.parametrize("options, message", [
    ({"ranks": [3]}, "rank 3 needs top_k >= 4"),
    ({"ranks": []}, "at least one rank"),
    ({"ranks": [1, 1]}, "names a rank twice"),
    ({"ranks": [-1]}, "integers >= 0"),
    ({"rank": [0]}, "has no option(s) rank"),
])
def test_bad_ranks_name_the_option(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoEConfig(num_experts=6, top_k=2, d_model=8, d_ff=4, routing_edit="ranks", routing_edit_options=options)


def test_routing_edit_is_a_registered_method_written_only_when_set():
    cfg = MoEConfig(num_experts=6, top_k=2, d_model=8, d_ff=4)
    assert "routing_edit" not in cfg.to_dict() and MoEConfig.from_dict(cfg.to_dict()) == cfg
    edited = cfg.replace(routing_edit="ranks", routing_edit_options={"ranks": [1]})
    assert edited.to_dict()["routing_edit_options"] == {"ranks": [1]}
    assert MoEConfig.from_dict(edited.to_dict()) == edited
    assert edited.options_of("ranks").ranks == (1,)
    with pytest.raises(ValueError, match="MoEConfig.routing_edit='shuffle' is unknown; known: none, "):
        cfg.replace(routing_edit="shuffle")
