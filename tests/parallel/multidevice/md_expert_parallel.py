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


# every exchange on two mesh shapes, every mesh shape with two exchanges
@pytest.mark.parametrize("impl,mesh_spec", [
    ("padded", "data=1,expert=8"), ("padded", "data=4,expert=2"), ("ragged", "data=2,expert=4"),
    ("ragged", "data=8,expert=1"), ("allgather", "data=1,expert=8"), ("allgather", "data=2,expert=4"),
    ("ragged", "data=4,expert=2"), ("allgather", "data=8,expert=1"),
])
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
