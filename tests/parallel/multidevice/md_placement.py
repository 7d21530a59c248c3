"""Expert placements on 8 simulated CPU devices: the expert-parallel layer gives the single-device
layer's outputs and gradients under any placement, replicas included, with every exchange."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe.parallel import ExpertParallel, make_mesh, shard_tree
from jmoe.parallel.expert_parallel import physical_ids
from tests.util import tree_allclose

CFG = jmoe.MoEConfig(num_experts=8, top_k=2, d_model=16, d_ff=32, dispatch_options=dict(block_size=16))
T = 64
RNG = np.random.default_rng(0)
PLACEMENTS = {
    "permutation": RNG.permutation(8),
    "replicas": np.array([0, 0, 1, 2, 3, 0, 4, 5, 6, 7, 1, 0, 2, 3, 4, 0]),  # 16 slots, hot experts 0 and 1
    "all_of_one_device": np.array([5, 5, 5, 5, 0, 1, 2, 3, 4, 6, 7, 5, 5, 5, 5, 5]),
}


def grads(cfg, params, x, ep=None, slots=None):
    def f(p, x):
        y, aux = jmoe.moe_layer(p, x, cfg, ep=ep, slots=slots)
        return jnp.sum(jnp.sin(y)) + aux.loss, (y, aux.load)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)


def placed_case(name):
    """(slots of placement `name`, the layer's params, its input, the single-device layer's
    (loss, (y, load)) and gradients)."""
    slots = jnp.asarray(PLACEMENTS[name], jnp.int32)
    params = jmoe.init_moe(jax.random.key(0), CFG)
    x = jax.random.normal(jax.random.key(1), (4, T // 4, CFG.d_model))
    return slots, params, x, grads(CFG, params, x)


@pytest.mark.parametrize("impl,mesh_spec,name", [
    ("padded", "data=1,expert=8", "permutation"), ("padded", "data=1,expert=8", "replicas"),
    ("padded", "data=2,expert=4", "all_of_one_device"), ("ragged", "data=2,expert=4", "replicas"),
    ("ragged", "data=4,expert=2", "all_of_one_device"), ("allgather", "data=4,expert=2", "replicas"),
    ("padded", "fsdp=2,expert=4", "replicas"), ("padded", "expert=4,model=2", "permutation"),
])
def test_any_placement_equals_the_single_device_layer(impl, mesh_spec, name):
    slots, params, x, ((l0, (y0, load0)), g0) = placed_case(name)
    (l1, (y1, load1)), g1 = grads(CFG, params, x, ExpertParallel(make_mesh(mesh_spec), impl=impl), slots)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    np.testing.assert_allclose(load1, load0, rtol=1e-6)  # loads stay per expert, not per slot
    tree_allclose(g1, g0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl,mesh_spec,name", [
    ("padded", "data=1,expert=8", "replicas"), ("ragged", "data=2,expert=4", "all_of_one_device"),
    ("allgather", "data=4,expert=2", "replicas"), ("padded", "fsdp=2,expert=4", "replicas"),
    ("padded", "expert=4,model=2", "replicas"), ("padded", "data=2,expert=4", "permutation"),
])
def test_experts_stored_in_their_slots_equal_the_single_device_layer(impl, mesh_spec, name):
    """Every copy of an expert gets the expert's whole gradient, and nothing but tokens moves."""
    slots, params, x, ((l0, (y0, load0)), g0) = placed_case(name)
    ep = ExpertParallel(make_mesh(mesh_spec), impl=impl, experts_in_slots=True)
    stored = shard_tree(dict(params, experts=jax.tree.map(lambda w: w[slots], params["experts"])), ep.mesh)
    (l1, (y1, load1)), (gp, gx) = grads(CFG, stored, x, ep, slots)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    np.testing.assert_allclose(load1, load0, rtol=1e-6)
    tree_allclose(gx, g0[1], rtol=1e-4, atol=1e-5)
    tree_allclose({k: v for k, v in gp.items() if k != "experts"}, {k: v for k, v in g0[0].items() if k != "experts"},
                  rtol=1e-4, atol=1e-5)
    tree_allclose(gp["experts"], jax.tree.map(lambda w: w[slots], g0[0]["experts"]), rtol=1e-4, atol=1e-5)


def test_experts_stored_in_their_slots_move_only_tokens_and_the_copies_gradients():
    sys.path.insert(0, str(Path(__file__).parents[3] / "experiments"))
    from bench_expert_parallel import bytes_sent_per_device

    slots = jnp.asarray([0, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2], jnp.int32)  # 4 redundant slots on 4 devices
    params = jmoe.init_moe(jax.random.key(0), CFG)
    x = jax.random.normal(jax.random.key(1), (T, CFG.d_model))
    mesh = make_mesh("data=2,expert=4")
    sent = {}
    for name, ep, p in (("per_expert", ExpertParallel(mesh, impl="padded"), params),
                        ("in_slots", ExpertParallel(mesh, impl="padded", experts_in_slots=True),
                         dict(params, experts=jax.tree.map(lambda w: w[slots], params["experts"])))):
        f = jax.jit(jax.grad(lambda p, x, ep=ep: jnp.sum(jmoe.moe_layer(p, x, CFG, ep=ep, slots=slots)[0] ** 2)))
        sent[name] = bytes_sent_per_device(f.lower(shard_tree(p, mesh), x).compile().as_text())
    expert_bytes = sum(w[0].nbytes for w in jax.tree.leaves(params["experts"]))
    # per expert, the 8 experts are gathered into their slots every step and their gradients
    # scattered back; in slots, only tokens move, and the 4 redundant rows' gradients are summed
    assert sent["per_expert"]["all-gather"] >= 0.75 * 8 * expert_bytes
    assert "all-gather" not in sent["in_slots"] and "reduce-scatter" not in sent["in_slots"]
    assert sent["in_slots"]["all-to-all"] == sent["per_expert"]["all-to-all"]
    # an all-reduce of the 4 redundant rows over the 4 expert devices, the data axis's gradient sum
    # of the device's 3 slots, and the loads' scalars
    assert sent["in_slots"]["all-reduce"] <= (2 * 0.75 * 4 + 3) * expert_bytes + 1024


def test_all_tokens_to_one_replicated_expert_split_between_its_copies():
    cfg = CFG.replace(top_k=1)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    params["router"]["w"] = params["router"]["w"].at[:, 3].add(100.0)  # every token picks expert 3
    slots = jnp.asarray([3, 0, 3, 1, 3, 2, 3, 4, 3, 5, 3, 6, 3, 7, 3, 3], jnp.int32)
    x = jax.random.normal(jax.random.key(1), (T, cfg.d_model))
    (l0, (y0, _)), g0 = grads(cfg, params, x)
    (l1, (y1, _)), g1 = grads(cfg, params, x, ExpertParallel(make_mesh("expert=8"), impl="padded"), slots)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    tree_allclose(g1, g0, rtol=1e-4, atol=1e-5)
    ids = physical_ids(slots, jnp.full((T, 1), 3, jnp.int32), 8, 0)
    copies = np.flatnonzero(np.asarray(slots) == 3)
    per_copy = np.bincount(np.asarray(ids).ravel(), minlength=16)[copies]
    assert per_copy.sum() == T and per_copy.max() - per_copy.min() <= 1  # 64 tokens over 9 copies: 7 or 8 each


def test_a_placement_that_cannot_hold_the_experts_is_refused():
    params = jmoe.init_moe(jax.random.key(0), CFG)
    x = jnp.ones((T, CFG.d_model))
    ep = ExpertParallel(make_mesh("expert=8"), impl="padded")
    with pytest.raises(ValueError, match="cannot hold the layer's 8 experts"):
        jmoe.moe_layer(params, x, CFG, ep=ep, slots=jnp.arange(4, dtype=jnp.int32))
    with pytest.raises(ValueError, match="cannot hold the layer's 8 experts"):
        jmoe.moe_layer(params, x, CFG, ep=ep, slots=jnp.arange(12, dtype=jnp.int32) % 8)
    held = ExpertParallel(make_mesh("expert=8"), impl="padded", experts_in_slots=True)
    with pytest.raises(ValueError, match=r"has shape \(8, 16, 32\), expected \(16, 16, 32\) for 16 slots"):
        jmoe.moe_layer(params, x, CFG, ep=held, slots=jnp.arange(16, dtype=jnp.int32) % 8)
    with pytest.raises(ValueError, match="needs its placement"):
        jmoe.moe_layer(params, x, CFG, ep=held)
    with pytest.raises(ValueError, match="experts_in_slots needs an expert placement's layout"):
        ExpertParallel(make_mesh("data=8"), impl="padded", experts_in_slots=True)


# ----------------------------------------------------------------------------- training


def micro():
    from jmoe.nn import LMConfig
    from jmoe.train import TrainConfig

    # a strong initial skew: every router starts preferring expert 0
    model = LMConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32,
                     moe=jmoe.MoEConfig(num_experts=8, top_k=2, d_model=32, d_ff=16, dispatch_options=dict(block_size=32)))
    tc = TrainConfig(steps=6, batch_size=8, seq_len=32, eval_every=3, eval_batches=2, ckpt_every=3, warmup_steps=2,
                     mesh="data=2,expert=4", ep_impl="padded")
    return model, tc


def records(run, kind):
    from jmoe.train import read_metrics

    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == kind]


@pytest.fixture(scope="module")
def corpus():
    from jmoe.data import load_corpus

    return load_corpus(None)


def quiet_train(model, tc, out, corpus, **kw):
    from jmoe.train import train

    return train(model, tc, out, corpus=corpus, progress=False, log=lambda m: None, **kw)


def test_rebalancing_changes_the_placement_and_no_number_of_the_run(tmp_path, corpus):
    from jmoe.train import load_run

    model, tc = micro()
    quiet_train(model, tc, tmp_path / "plain", corpus)
    rebal = tc.replace(rebalance_every=2, redundant_experts=4)
    quiet_train(model, rebal, tmp_path / "rebal", corpus)
    plain = [r["loss"] for r in records(tmp_path / "plain", "train")]
    moved = [r["loss"] for r in records(tmp_path / "rebal", "train")]
    np.testing.assert_allclose(moved, plain, rtol=1e-5)
    np.testing.assert_allclose([r["val_loss"] for r in records(tmp_path / "rebal", "eval")],
                               [r["val_loss"] for r in records(tmp_path / "plain", "eval")], rtol=1e-5)
    # the experts' copies count once in the clipped norm, and the checkpoint holds each expert once
    np.testing.assert_allclose([r["grad_norm"] for r in records(tmp_path / "rebal", "train")],
                               [r["grad_norm"] for r in records(tmp_path / "plain", "train")], rtol=1e-4)
    assert max(r["grad_norm"] for r in records(tmp_path / "plain", "train")) > tc.grad_clip  # the clip acts
    tree_allclose(load_run(tmp_path / "rebal")[2], load_run(tmp_path / "plain")[2], rtol=1e-4, atol=1e-6)
    steps = records(tmp_path / "rebal", "rebalance")
    assert [r["step"] for r in steps] == [2, 4, 6]
    assert all(r["excess_load_after"] <= r["excess_load_before"] + 1e-9 for r in steps)
    _, _, _, state, _, _ = load_run(tmp_path / "rebal")
    slots = np.asarray(state["placement/0"])
    assert slots.shape == (12,) and sorted(set(slots.tolist())) == list(range(8))
    assert not np.array_equal(slots, np.r_[np.arange(8), np.arange(4)])  # it moved from where it started


def test_a_resumed_rebalancing_run_equals_an_uninterrupted_one(tmp_path, corpus):
    from jmoe.train import load_run

    model, tc = micro()
    tc = tc.replace(rebalance_every=2, redundant_experts=4)
    quiet_train(model, tc, tmp_path / "straight", corpus)
    quiet_train(model, tc, tmp_path / "halves", corpus, stop_after=3)
    quiet_train(model, tc, tmp_path / "halves", corpus, resume=True)
    assert records(tmp_path / "halves", "rebalance") == records(tmp_path / "straight", "rebalance")
    a, b = (load_run(tmp_path / n)[3] for n in ("straight", "halves"))
    assert all(np.array_equal(a[k], b[k]) for k in a if k.startswith("placement"))


def test_a_placement_file_runs_from_the_first_step(tmp_path, corpus):
    from jmoe.parallel.placement import ExpertPlacement

    model, tc = micro()
    pl = ExpertPlacement(slots=np.stack([RNG.permutation(8), RNG.permutation(8)]), num_experts=8, num_devices=4,
                         layers=(0, 1))
    quiet_train(model, tc.replace(steps=2), tmp_path / "plain", corpus)
    quiet_train(model, tc.replace(steps=2, placement=str(pl.save(tmp_path / "p.json"))), tmp_path / "placed", corpus)
    np.testing.assert_allclose([r["loss"] for r in records(tmp_path / "placed", "train")],
                               [r["loss"] for r in records(tmp_path / "plain", "train")], rtol=1e-5)


def test_a_placed_run_started_from_another_run_with_accumulated_gradients_equals_a_plain_one(tmp_path, corpus):
    """--resume-from brings the parameters in per expert; the placed run holds them in its slots."""
    from jmoe.parallel.placement import ExpertPlacement

    model, tc = micro()
    quiet_train(model, tc.replace(steps=2), tmp_path / "source", corpus)
    pl = ExpertPlacement(slots=np.stack([np.r_[RNG.permutation(8), 0, 0, 1, 2]] * 2), num_experts=8, num_devices=4,
                         layers=(0, 1))
    follow = tc.replace(steps=2, batch_size=16, grad_accum=2, init_from=str(tmp_path / "source"))
    quiet_train(model, follow, tmp_path / "plain", corpus)
    quiet_train(model, follow.replace(placement=str(pl.save(tmp_path / "p.json"))), tmp_path / "placed", corpus)
    for kind, key in (("train", "loss"), ("train", "grad_norm")):
        np.testing.assert_allclose([r[key] for r in records(tmp_path / "placed", kind)],
                                   [r[key] for r in records(tmp_path / "plain", kind)], rtol=1e-4)
