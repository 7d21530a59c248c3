"""The expert-parallel layer and sharded training on 8 simulated CPU devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe.parallel import ExpertParallel, ep_assignment, make_mesh
from tests.util import tree_allclose

CFG = jmoe.MoEConfig(num_experts=8, top_k=2, d_model=16, d_ff=32, dispatch_options=dict(block_size=16))
T = 64


def single_device(cfg, params, x):
    def f(p, x):
        y, aux = jmoe.moe_layer(p, x, cfg)
        return jnp.sum(jnp.sin(y)) + aux.loss, (y, aux)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)


def expert_parallel(cfg, params, x, ep):
    def f(p, x):
        y, aux = jmoe.moe_layer(p, x, cfg, ep=ep)
        return jnp.sum(jnp.sin(y)) + aux.loss, (y, aux)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)


def assert_same(single, parallel, rtol=1e-5, atol=1e-5, grad_rtol=1e-4, grad_atol=1e-5):
    (l0, (y0, a0)), g0 = single
    (l1, (y1, a1)), g1 = parallel
    f32 = lambda a: np.asarray(a, np.float32)
    np.testing.assert_allclose(f32(y1), f32(y0), rtol=rtol, atol=atol)
    np.testing.assert_allclose(l1, l0, rtol=rtol)
    for name in ("loss", "balance_loss", "z_loss", "router_entropy", "dropped_fraction"):
        np.testing.assert_allclose(getattr(a1, name), getattr(a0, name), rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(a1.load, a0.load, rtol=1e-6)
    np.testing.assert_array_equal(a1.routing.expert_ids, a0.routing.expert_ids)
    tree_allclose(jax.tree.map(f32, g1), jax.tree.map(f32, g0), rtol=grad_rtol, atol=grad_atol)


@pytest.mark.parametrize("mesh_spec", ["data=1,expert=8", "data=2,expert=4", "data=4,expert=2", "data=8,expert=1"])
@pytest.mark.parametrize("impl", ["padded", "ragged", "allgather"])
def test_equals_single_device_when_nothing_drops(mesh_spec, impl):
    params = jmoe.init_moe(jax.random.key(0), CFG)
    x = jax.random.normal(jax.random.key(1), (4, T // 4, CFG.d_model))
    ep = ExpertParallel(make_mesh(mesh_spec), impl=impl)  # dropless: room for every slot
    assert_same(single_device(CFG, params, x), expert_parallel(CFG, params, x, ep))


@pytest.mark.parametrize("mesh_spec", ["data=2,expert=2,model=2", "fsdp=2,expert=4", "fsdp=2,expert=2,model=2"])
def test_tensor_and_fsdp_axes(mesh_spec):
    cfg = CFG.replace(num_shared_experts=1, d_ff_shared=16, activation="geglu")
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (T, cfg.d_model))
    mesh = make_mesh(mesh_spec)
    ep = ExpertParallel(mesh, impl="padded")
    sharded = jmoe.parallel.shard_tree(params, mesh)
    assert sharded["experts"]["w_up"].sharding.spec[0] == "expert"
    assert_same(single_device(cfg, params, x), expert_parallel(cfg, sharded, x, ep))


def shard_blocks(mesh):
    """Token shards in order, and the expert-group index of each (tokens split over data x expert)."""
    n_data, n_exp = mesh.shape.get("data", 1), mesh.shape["expert"]
    return [(d, e) for d in range(n_data) for e in range(n_exp)]


def capacity(cf):
    return CFG.replace(dispatch="capacity", dispatch_options=dict(capacity_factor=cf))


def padded_keep(cfg, ids, mask, n=4, shards=8):
    """The padded exchange's kept slots: each token shard fills C rows per destination device."""
    t_local = ids.shape[0] // shards
    C = math.ceil(cfg.dispatch_options.capacity_factor * t_local * cfg.top_k / n)
    keep = np.zeros_like(mask)
    for s in range(shards):  # each token shard applies the priority rule to its own tokens
        sl = slice(s * t_local, (s + 1) * t_local)
        fill = np.zeros(n, int)
        for j in range(cfg.top_k):
            for t in range(sl.start, sl.stop):
                dest = ids[t, j] // (cfg.num_experts // n)
                keep[t, j] = fill[dest] < C
                fill[dest] += 1
        _, _, k2 = ep_assignment(jnp.asarray(ids[sl]), jnp.asarray(mask[sl]), cfg.num_experts, n, C)
        np.testing.assert_array_equal(k2, keep[sl])
    return keep


def ragged_keep(cfg, ids, n=4, n_data=2):
    """The ragged exchange's kept slots: senders fill each receiver's R rows in device order."""
    t_local, k = ids.shape[0] // (n * n_data), cfg.top_k
    e_local = cfg.num_experts // n
    R = math.ceil(cfg.dispatch_options.capacity_factor * t_local * k)
    keep = np.zeros(ids.shape, bool)
    for d in range(n_data):  # each data group exchanges among its n expert devices
        shards = [d * n + i for i in range(n)]
        blocks = {}  # each sender's slots, sorted by (expert, slot index): destination blocks
        for i, s in enumerate(shards):
            slots = [(ids[t, j], t * k + j, t, j) for t in range(s * t_local, (s + 1) * t_local) for j in range(k)]
            slots.sort()
            for dest in range(n):
                blocks[i, dest] = [(t, j) for e, _, t, j in slots if e // e_local == dest]
        for dest in range(n):
            space = R
            for i in range(n):
                for (t, j) in blocks[i, dest][:space]:
                    keep[t, j] = True
                space -= min(space, len(blocks[i, dest]))
    return keep


def allgather_keep(cfg, ids, mask, n_data=2):
    """The all-gather exchange's kept slots: the capacity rule over each expert group's tokens."""
    from jmoe.dispatch.capacity import capacity_assignment, expert_capacity

    t_group = ids.shape[0] // n_data
    C = expert_capacity(t_group, cfg.top_k, cfg.num_experts, cfg.dispatch_options.capacity_factor)
    return np.concatenate([
        np.asarray(capacity_assignment(jnp.asarray(ids[g * t_group:(g + 1) * t_group]),
                                       jnp.asarray(mask[g * t_group:(g + 1) * t_group]), cfg.num_experts, C)[1])
        for g in range(n_data)
    ])


def test_padded_drops_exactly_the_predicted_slots():
    mesh = make_mesh("data=2,expert=4")
    cfg = capacity(0.5)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (T, cfg.d_model))
    ep = ExpertParallel(mesh, impl="padded")
    y, aux = jax.jit(lambda p, x: jmoe.moe_layer(p, x, cfg, ep=ep))(params, x)
    _, ref_aux = jmoe.moe_layer(params, x, cfg)
    ids, w, mask = (np.asarray(a) for a in (ref_aux.routing.expert_ids, ref_aux.routing.weights, ref_aux.routing.mask))
    keep = padded_keep(cfg, ids, mask)
    assert (~keep).sum() > 0
    np.testing.assert_allclose(aux.dropped_fraction, (~keep).sum() / keep.size, rtol=1e-6)
    kept = ref_aux.routing.replace(weights=jnp.where(keep, w, 0.0))
    ref, _ = jmoe.dispatch.get_dispatch("dense")(params["experts"], x, kept, cfg)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_ragged_drops_exactly_the_predicted_slots():
    mesh = make_mesh("data=2,expert=4")
    cfg = capacity(0.6)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (T, cfg.d_model)) * 3
    ep = ExpertParallel(mesh, impl="ragged")
    y, aux = jax.jit(lambda p, x: jmoe.moe_layer(p, x, cfg, ep=ep))(params, x)
    _, ref_aux = jmoe.moe_layer(params, x, cfg)
    ids, w = np.asarray(ref_aux.routing.expert_ids), np.asarray(ref_aux.routing.weights)
    keep = ragged_keep(cfg, ids)
    assert (~keep).sum() > 0
    np.testing.assert_allclose(aux.dropped_fraction, (~keep).sum() / keep.size, rtol=1e-6)
    kept = ref_aux.routing.replace(weights=jnp.where(keep, w, 0.0))
    ref, _ = jmoe.dispatch.get_dispatch("dense")(params["experts"], x, kept, cfg)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- training

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


@pytest.mark.parametrize(
    "changes",
    [
        dict(router="sigmoid_bias", router_options=dict(expert_groups=4, topk_groups=2), balance_loss="seq_aux"),
        dict(router="moepp", router_options=dict(num_zero_experts=1, num_copy_experts=1, num_constant_experts=2,
                                                gating_residual=True)),
        dict(router="null_experts", router_options=dict(num_null_experts=4)),
        dict(router="top_p", top_k=4, router_options=dict(threshold=0.3), entropy_loss_coef=0.1, balance_scope="sequence"),
        dict(router="recurrent", router_options=dict(recurrent_dim=8), balance_loss="device", balance_options=dict(devices=4)),
    ],
)
def test_routing_zoo_on_a_mesh_equals_one_device(changes):
    cfg = CFG.replace(**changes)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    state = jmoe.init_moe_state(cfg)
    x = jax.random.normal(jax.random.key(1), (8, 8, cfg.d_model))  # 8 sequences of 8 tokens
    C = cfg.num_choices
    carry = jax.random.normal(jax.random.key(2), (64, cfg.router_options.recurrent_dim if cfg.router == "recurrent" else C))
    carry = carry if cfg.router in ("moepp", "recurrent") else None
    if state is not None:
        state = {"bias": jax.random.normal(jax.random.key(3), (cfg.num_experts,)) * 0.1}
    ep = ExpertParallel(make_mesh("data=2,expert=4"), impl="padded")

    def run(ep):
        def f(p, x):
            y, aux = jmoe.moe_layer(p, x, cfg, state=state, carry=carry, ep=ep)
            return jnp.sum(jnp.sin(y)) + aux.loss, (y, aux)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)

    single, parallel = run(None), run(ep)
    assert_same(single, parallel)
    (_, (_, a0)), _ = single
    (_, (_, a1)), _ = parallel
    np.testing.assert_allclose(a1.tokens_per_expert, a0.tokens_per_expert)
    np.testing.assert_allclose(a1.experts_per_token, a0.experts_per_token, rtol=1e-6)
    if a0.routing.carry is not None:
        np.testing.assert_allclose(a1.routing.carry, a0.routing.carry, rtol=1e-5, atol=1e-6)
    if state is not None:  # every device would apply the same bias update
        s0 = jmoe.layer.update_moe_state(state, a0, cfg)
        s1 = jmoe.layer.update_moe_state(state, a1, cfg)
        np.testing.assert_array_equal(s0["bias"], s1["bias"])


@pytest.mark.parametrize("impl", ["padded", "allgather"])
def test_merged_experts_with_an_expert_map_equal_one_device(impl):
    """A merged layer (8 router outputs sharing 4 experts) runs expert-parallel like on one device."""
    cfg = CFG.replace(num_experts=4, expert_map=(0, 1, 2, 3, 3, 2, 1, 0))
    params = jmoe.init_moe(jax.random.key(0), cfg)
    assert params["router"]["w"].shape[-1] == 8 and params["experts"]["w_up"].shape[0] == 4
    x = jax.random.normal(jax.random.key(1), (T, cfg.d_model))
    ep = ExpertParallel(make_mesh("data=2,expert=4"), impl=impl)
    assert_same(single_device(cfg, params, x), expert_parallel(cfg, params, x, ep))


# ------------------------------------------------- one layer body on one device and on a mesh


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["padded", "ragged", "allgather"])
def test_shared_gate_and_dtype_equal_one_device(impl, dtype):
    """Shared experts with a gate, in float32 and bfloat16, through each exchange."""
    cfg = CFG.replace(num_shared_experts=1, d_ff_shared=16, shared_gate=True, dtype=dtype)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    assert "shared_gate" in params
    x = jax.random.normal(jax.random.key(1), (4, T // 4, cfg.d_model))
    ep = ExpertParallel(make_mesh("data=2,expert=4"), impl=impl)
    single, parallel = single_device(cfg, params, x), expert_parallel(cfg, params, x, ep)
    assert parallel[0][1][0].dtype == jnp.dtype(dtype)
    if dtype == "float32":
        assert_same(single, parallel)
    else:  # the same operations, rounded to bfloat16 at the same places up to summation order
        assert_same(single, parallel, rtol=2e-2, atol=2e-2, grad_rtol=2e-2, grad_atol=2e-2)


def _kept_reference(name, keep):
    """A dispatch that computes exactly the slots in `keep` (registered once under `name`)."""
    from jmoe.registry import DISPATCHERS

    keep = jnp.asarray(keep)

    def kept(expert_params, x, routing, cfg):
        r = routing.replace(weights=jnp.where(keep, routing.weights, 0.0), mask=routing.mask & keep)
        y, _ = DISPATCHERS.get("dense")(expert_params, x, r, cfg)
        return y, jnp.sum(routing.mask & ~keep).astype(jnp.float32)

    DISPATCHERS.add(name, kept)
    return name


@pytest.mark.parametrize("impl", ["padded", "ragged", "allgather"])
def test_dropped_tokens_forward_and_gradients(impl):
    """With slots dropped, the layer and its gradients equal the single-device layer that
    computes exactly the slots the exchange keeps."""
    from jmoe.registry import DISPATCHERS

    cfg = capacity(0.5).replace(num_shared_experts=1, d_ff_shared=16, shared_gate=True)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (T, cfg.d_model)) * 3
    _, ref_aux = jmoe.moe_layer(params, x, cfg)
    ids, mask = np.asarray(ref_aux.routing.expert_ids), np.asarray(ref_aux.routing.mask)
    keep = {"padded": lambda: padded_keep(cfg, ids, mask), "ragged": lambda: ragged_keep(cfg, ids),
            "allgather": lambda: allgather_keep(cfg, ids, mask)}[impl]()
    assert 0 < (~keep).sum() < keep.size
    name = _kept_reference(f"kept_by_{impl}", keep)
    try:
        reference = single_device(cfg.replace(dispatch=name), params, x)
    finally:
        DISPATCHERS.remove(name)
    parallel = expert_parallel(cfg, params, x, ExpertParallel(make_mesh("data=2,expert=4"), impl=impl))
    assert_same(reference, parallel)
    np.testing.assert_allclose(parallel[0][1][1].dropped_fraction, (~keep).sum() / keep.size, rtol=1e-6)


def test_allgather_capacity_on_one_data_shard_is_the_single_device_capacity_dispatch():
    cfg = capacity(0.5)
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (T, cfg.d_model)) * 3
    single = single_device(cfg, params, x)
    assert float(single[0][1][1].dropped_fraction) > 0
    assert_same(single, expert_parallel(cfg, params, x, ExpertParallel(make_mesh("data=1,expert=8"), impl="allgather")))


def test_dispatches_that_cannot_run_on_a_mesh_are_refused():
    cfg = CFG.replace(dispatch="dense")
    params = jmoe.init_moe(jax.random.key(0), cfg)
    x = jnp.ones((T, cfg.d_model))
    with pytest.raises(ValueError, match="dispatch='dense' cannot run expert-parallel"):
        jmoe.moe_layer(params, x, cfg, ep=ExpertParallel(make_mesh("data=2,expert=4")))
