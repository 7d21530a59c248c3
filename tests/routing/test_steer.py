"""Expert steering (`jmoe.routing.steer`, RICE) against a loop over tokens, its per-layer
config and its checks."""

import jax
import numpy as np
import pytest

from jmoe import MoEConfig
from jmoe.nn import LMConfig
from jmoe.routing.steer import steer_config, steer_weights
from tests.util import make_routing


@pytest.mark.parametrize("renormalize", [True, False])
def test_steer_weights_equals_a_loop_over_tokens(renormalize):
    routing = make_routing(jax.random.key(0), 16, 6, 3, mask_prob=0.2)
    got = steer_weights(routing, (1, 4), 8.0, renormalize)
    ids, w, m = (np.asarray(x) for x in (routing.expert_ids, routing.weights, routing.mask))
    for t in range(16):
        row = np.where(m[t], w[t], 0.0)
        new = np.where(m[t] & np.isin(ids[t], [1, 4]), 8.0 * row, row)
        if renormalize and new.sum() > 0:
            new = new * row.sum() / new.sum()
        np.testing.assert_allclose(np.asarray(got.weights[t]), new, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got.mask, routing.mask)  # the router's selection is kept
    np.testing.assert_array_equal(got.expert_ids, routing.expert_ids)


MOE = MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8)
CFG = LMConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=4, d_ff=16, max_seq_len=32, moe=MOE, dense_layers=(0,))


def test_steer_config_edits_the_layers_named():
    cfg = steer_config(CFG, [(2, 3), (1, 0), (2, 1)], factor=16.0)
    assert cfg.moe_for(1).routing_edit_options.experts == (0,)
    assert cfg.moe_for(2).routing_edit_options.experts == (1, 3)
    assert cfg.moe_for(2).routing_edit_options.factor == 16.0
    assert LMConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("pairs, message", [
    ([(0, 1)], "layer 0 is not an MoE layer"),
    ([(1, 4)], "expert 4 is outside the layer's 4 experts"),
    ([], "at least one"),
])
def test_bad_steering_names_the_layer(pairs, message):
    with pytest.raises(ValueError, match=message):
        steer_config(CFG, pairs)
