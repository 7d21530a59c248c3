"""Gradient accumulation with a global-scope balance loss equals the unsplit step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig
from jmoe.nn import LMConfig
from jmoe.train import TrainConfig, make_optimizer
from jmoe.train.trainer import init_train_state, make_train_step
from tests.util import tree_allclose

MODEL = LMConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16,
                 moe=MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8, dispatch_options=dict(block_size=16), aux_loss_coef=1.0))


def one_step(model, grad_accum):
    tc = TrainConfig(steps=10, batch_size=8, seq_len=16, grad_accum=grad_accum)
    tx, sched = make_optimizer(tc)
    state = init_train_state(model, tc, tx)
    batch = jax.random.randint(jax.random.key(5), (8, 17), 0, 256)
    step = make_train_step(model, tx, sched, grad_accum=grad_accum)
    return step(state, batch)


@pytest.mark.parametrize("router", ["topk", "sigmoid_bias"])
def test_global_scope_accumulation_equals_one_batch(router):
    model = MODEL.replace(moe=MODEL.moe.replace(router=router))
    s1, m1 = one_step(model, 1)
    s4, m4 = one_step(model, 4)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["aux_loss"], m1["aux_loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["load"], m1["load"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    tree_allclose(s4["params"], s1["params"], rtol=1e-4, atol=1e-6)
    if router == "sigmoid_bias":  # the bias update saw the counts of the whole step
        tree_allclose(s4["router_state"], s1["router_state"])
        assert float(jnp.abs(s1["router_state"]["0"]["bias"]).sum()) > 0


def test_micro_scope_differs():
    model = MODEL.replace(moe=MODEL.moe.replace(balance_scope="micro"))
    _, m1 = one_step(model, 1)
    _, m4 = one_step(model, 4)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)  # same tokens, same CE
    assert abs(float(m4["aux_loss"]) - float(m1["aux_loss"])) > 1e-4
