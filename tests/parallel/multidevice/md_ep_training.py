"""Sharded training on 8 simulated CPU devices: equal to one device, and checkpoints that
restore on other mesh shapes."""

import numpy as np
import pytest

import jmoe
from tests.util import tree_allclose


MICRO = None


def micro():
    from jmoe.nn import LMConfig
    from jmoe.train import TrainConfig

    model = LMConfig(
        d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32,
        moe=jmoe.MoEConfig(num_experts=8, top_k=2, d_model=32, d_ff=16, dispatch_options=dict(block_size=32)),
    )
    tc = TrainConfig(steps=6, batch_size=8, seq_len=32, eval_every=3, eval_batches=2, ckpt_every=3,
                     warmup_steps=2)
    return model, tc


def losses(run):
    from jmoe.train import read_metrics

    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


@pytest.fixture(scope="module")
def corpus():
    from jmoe.data import load_corpus

    return load_corpus(None)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, corpus):
    from jmoe.train import train

    model, tc = micro()
    out = tmp_path_factory.mktemp("single") / "run"
    train(model, tc, out, corpus=corpus, progress=False, log=lambda m: None)
    return out


def test_training_on_a_2x4_mesh_equals_one_device(tmp_path, corpus, single_run):
    from jmoe.train import train

    model, tc = micro()
    out = tmp_path / "mesh"
    train(model, tc.replace(mesh="data=2,expert=4"), out, corpus=corpus, progress=False, log=lambda m: None)
    np.testing.assert_allclose(losses(out), losses(single_run), rtol=2e-5)


def test_checkpoint_from_2x4_restores_on_1x8_and_one_device(tmp_path, corpus, single_run):
    from jmoe.train import load_run, train

    model, tc = micro()
    out = tmp_path / "reshard"
    train(model, tc.replace(mesh="data=2,expert=4"), out, corpus=corpus, stop_after=3, progress=False, log=lambda m: None)
    # continue on a different mesh shape
    train(model, tc.replace(mesh="data=1,expert=8"), out, corpus=corpus, resume=True, progress=False, log=lambda m: None)
    np.testing.assert_allclose(losses(out), losses(single_run), rtol=2e-5)
    # and on one device: the parameters equal the single-device run's
    _, _, params, _, _, step = load_run(out)
    _, _, params_single, _, _, _ = load_run(single_run)
    assert step == 6
    leaf = params["layers"]["0"]["moe"]["experts"]["w_up"]
    assert len(leaf.sharding.device_set) == 1
    tree_allclose(params, params_single, rtol=1e-4, atol=1e-5)


