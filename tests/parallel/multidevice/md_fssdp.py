"""FSSDP on 8 simulated CPU devices: experts sharded over every device, materialised where the
tokens are; equal to the single-device layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe.parallel import ExpertParallel, make_mesh, shard_tree
from jmoe.parallel.fssdp import FSSDP_RULES
from tests.util import tree_allclose

CFG = jmoe.MoEConfig(num_experts=16, top_k=2, d_model=16, d_ff=32, dispatch_options=dict(block_size=16))
T = 64


def grads(cfg, params, x, ep=None):
    def f(p, x):
        y, aux = jmoe.moe_layer(p, x, cfg, ep=ep)
        return jnp.sum(jnp.sin(y)) + aux.loss, (y, aux.load, aux.dropped_fraction)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)


@pytest.mark.parametrize("mesh_spec", ["data=8", "data=2,expert=4", "fsdp=2,expert=4"])
def test_fssdp_equals_the_single_device_layer(mesh_spec):
    cfg = CFG.replace(num_shared_experts=1, d_ff_shared=16)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (4, T // 4, cfg.d_model))
    mesh = make_mesh(mesh_spec)
    sharded = shard_tree(params, mesh, FSSDP_RULES)
    assert sharded["experts"]["w_up"].addressable_shards[0].data.shape[0] == 2  # 16 experts over 8 devices
    (l0, (y0, load0, _)), g0 = grads(cfg, params, x)
    (l1, (y1, load1, drop1)), g1 = grads(cfg, sharded, x, ExpertParallel(mesh, impl="fssdp"))
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    np.testing.assert_allclose(load1, load0, rtol=1e-6)
    assert float(drop1) == 0.0
    tree_allclose(g1, g0, rtol=1e-4, atol=1e-5)


def test_materialising_only_the_experts_in_use_changes_nothing():
    params = jmoe.init_moe(jax.random.key(0), CFG)
    params["router"]["w"] = params["router"]["w"].at[:, :12].set(-10.0)  # positive tokens: only 12..15 chosen
    x = jnp.abs(jax.random.normal(jax.random.key(1), (T, CFG.d_model))) + 0.1
    (_, (y0, load0, _)), g0 = grads(CFG, params, x)
    assert np.count_nonzero(np.asarray(load0)) == 4
    (_, (y1, _, drop)), g1 = grads(CFG, params, x, ExpertParallel(make_mesh("data=8"), impl="fssdp", fssdp_experts=4))
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    tree_allclose(g1, g0, rtol=1e-4, atol=1e-5)
    assert float(drop) == 0.0
    # fewer materialised experts than in use: the rest is dropped and counted
    (_, (_, _, drop2)), _ = grads(CFG, params, x, ExpertParallel(make_mesh("data=8"), impl="fssdp", fssdp_experts=2))
    assert float(drop2) > 0.0


def test_fssdp_refuses_what_it_cannot_run():
    params = jmoe.init_moe(jax.random.key(0), CFG)
    x = jnp.ones((T, CFG.d_model))
    with pytest.raises(ValueError, match="12 experts do not split evenly"):
        p12 = jmoe.init_moe(jax.random.key(0), CFG.replace(num_experts=12))
        jmoe.moe_layer(p12, x, CFG.replace(num_experts=12), ep=ExpertParallel(make_mesh("data=8"), impl="fssdp"))
    with pytest.raises(ValueError, match="cannot run under FSSDP, which is dropless"):
        cfg = CFG.replace(dispatch="capacity")
        jmoe.moe_layer(params, x, cfg, ep=ExpertParallel(make_mesh("data=8"), impl="fssdp"))
    with pytest.raises(ValueError, match="fssdp_experts"):
        ExpertParallel(make_mesh("data=8"), impl="padded", fssdp_experts=4)


def test_training_with_fssdp_equals_one_device(tmp_path):
    from jmoe.data import load_corpus
    from jmoe.nn import LMConfig
    from jmoe.train import TrainConfig, read_metrics, train

    model = LMConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32,
                     moe=jmoe.MoEConfig(num_experts=8, top_k=2, d_model=32, d_ff=16, dispatch_options=dict(block_size=32)))
    tc = TrainConfig(steps=3, batch_size=8, seq_len=32, eval_every=3, eval_batches=2, ckpt_every=3, warmup_steps=2)
    corpus = load_corpus(None)
    losses, dropped = [], []
    fssdp = tc.replace(mesh="data=8", ep_impl="fssdp")
    for name, t in (("one", tc), ("fssdp", fssdp), ("all8", fssdp.replace(fssdp_experts=8)),
                    ("two", fssdp.replace(fssdp_experts=2))):
        train(model, t, tmp_path / name, corpus=corpus, progress=False, log=lambda m: None)
        recs = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["kind"] == "train"]
        losses.append([r["loss"] for r in recs])
        dropped.append(np.mean([r["dropped"] for r in recs]))
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-5)
    np.testing.assert_allclose(losses[2], losses[0], rtol=2e-5)  # M = E gathers every expert
    assert dropped[0] == dropped[2] == 0.0
    # two experts per layer and step: most token-slots of 8 experts in use are dropped and counted
    assert dropped[3] > 0.5 and not np.allclose(losses[3], losses[0], rtol=1e-4)
