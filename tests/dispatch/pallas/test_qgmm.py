"""The quantized grouped matmul (`qgmm`, GPU kernels in Pallas interpret mode) equals the float
grouped matmul on the dequantized weights, forward and input gradient, at every bit width; the
Pallas dropless layer on quantized experts (one width, and MC-MoE's mixed widths) equals the
layer on their dequantized weights; the kernel lowers for CUDA. On a GPU machine,
`JMOE_PALLAS_COMPILED=1` runs the same tests on the compiled Triton kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jmoe
from jmoe.dispatch.pallas import qgmm, width_classes
from jmoe.experts import ExpertList
from jmoe.quant import QuantizedArray, quantize_expert_weights
from jmoe.quant.qarray import quantize_rtn
from tests.dispatch.pallas.test_kernels import COMPILED, INTERPRET, group_sizes

KW = dict(backend="gpu", interpret=INTERPRET)
TOL = dict(rtol=5e-3, atol=3e-2) if COMPILED else dict(rtol=1e-5, atol=1e-4)


def _weights(bits, G=4, K=128, N=40, group_size=64, seed=0):
    w = jax.random.normal(jax.random.key(seed), (G, K, N))
    q = quantize_rtn(w, bits, group_size)
    return q, q.dequantize()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("pattern", ["random_with_zeros", "one_group", "trailing_rows"])
def test_qgmm_equals_gmm_on_the_dequantized_weight(bits, pattern):
    """N = 40 is not a tile multiple (padded columns); K spans two quantization groups."""
    q, w = _weights(bits)
    m = 72
    sizes = group_sizes(pattern, 4, m, seed=bits)
    x = jax.random.normal(jax.random.key(1), (m, 128))
    f = jax.jit(lambda x: qgmm(x, q, sizes, tiling=(16, 32, 32), **KW))
    y = f(x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(lax.ragged_dot(x, w, sizes)), **TOL)
    assert not np.asarray(y[int(sizes.sum()):]).any()  # rows past the groups are zero
    # input gradient: the transposed kernel
    p = jax.random.normal(jax.random.key(2), y.shape)
    ga = jax.jit(jax.grad(lambda x: jnp.sum(qgmm(x, q, sizes, tiling=(16, 32, 32), **KW) * p)))(x)
    gb = jax.grad(lambda x: jnp.sum(lax.ragged_dot(x, w, sizes) * p))(x)
    np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), **TOL)


def test_qgmm_transposed_local_groups_tiles_and_frozen_scales():
    q, w = _weights(4, G=6, K=128, N=64, group_size=32)
    m = 96
    sizes = group_sizes("random_with_zeros", 6, m, seed=5)
    g = jax.random.normal(jax.random.key(3), (m, 64))
    # transposed: [m, N] @ W^T -> [m, K]; the tile along K is cut to the group size (32)
    yt = jax.jit(lambda g: qgmm(g, q, sizes, transpose_rhs=True, tiling=(32, 16, 64), **KW))(g)
    np.testing.assert_allclose(np.asarray(yt), np.asarray(lax.ragged_dot(g, jnp.swapaxes(w, 1, 2), sizes)), **TOL)
    # a shard of the groups (expert parallelism): rows of other groups are zero
    local = jax.tree.map(lambda a: a[2:5], q)
    x = jax.random.normal(jax.random.key(4), (m, 128))
    y = jax.jit(lambda x: qgmm(x, local, sizes, group_offset=2, **KW))(x)
    full = lax.ragged_dot(x, w, sizes)
    ends = np.cumsum(np.asarray(sizes))
    rows = np.zeros(m, bool)
    rows[ends[1]:ends[4]] = True
    np.testing.assert_allclose(np.asarray(y), np.where(rows[:, None], np.asarray(full), 0), **TOL)
    # the quantized weight is frozen: its scales and zero points get no gradient
    gq = jax.grad(lambda q: jnp.sum(qgmm(x, q, sizes, **KW)), allow_int=True)(q)
    assert not np.asarray(gq.scale).any() and not np.asarray(gq.zero).any()


def test_qgmm_bfloat16():
    q, w = _weights(4, group_size=32)
    q = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, q)
    sizes = group_sizes("random_with_zeros", 4, 64)
    x = jax.random.normal(jax.random.key(5), (64, 128), jnp.bfloat16)
    y = jax.jit(lambda x: qgmm(x, q, sizes, **KW))(x)
    assert y.dtype == jnp.bfloat16
    ref = lax.ragged_dot(x, q.dequantize(jnp.bfloat16), sizes, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=2e-2, atol=2e-2)


def test_qgmm_bad_input_names_what_is_wrong():
    q, w = _weights(4)
    sizes = jnp.array([2, 2, 2, 2], jnp.int32)
    x = jnp.ones((8, 128))
    with pytest.raises(TypeError, match="QuantizedArray rhs"):
        qgmm(x, w, sizes, **KW)
    with pytest.raises(ValueError, match=r"lhs must be \[m, 128\]"):
        qgmm(jnp.ones((8, 40)), q, sizes, **KW)
    with pytest.raises(ValueError, match="GPU kernels only"):
        qgmm(x, q, sizes, backend="tpu", interpret=True)
    with pytest.raises(ValueError, match="group_size=8"):
        qgmm(x, quantize_rtn(jnp.ones((4, 128, 40)), 4, 8), sizes, **KW)
    with pytest.raises(ValueError, match="group_sizes must be a 1-d integer array"):
        qgmm(x, q, sizes.astype(jnp.float32), **KW)


CFG = jmoe.MoEConfig(num_experts=4, top_k=2, d_model=64, d_ff=128, dispatch="dropless",
                     dispatch_options=dict(impl="pallas"))


def _layer_case(bits, seed):
    params = jmoe.init_moe(jax.random.key(seed), CFG)
    if isinstance(bits, int):
        experts = quantize_expert_weights(params["experts"], bits, group_size=32)
        deq = {n: w.dequantize() for n, w in experts.items()}
    else:  # one width per expert, as MC-MoE allocates
        experts = ExpertList([{n: quantize_rtn(w[e], bits[e], 32) for n, w in params["experts"].items()}
                              for e in range(len(bits))])
        deq = {n: jnp.stack([experts.experts[e][n].dequantize() for e in range(len(bits))]) for n in params["experts"]}
    return {**params, "experts": experts}, {**params, "experts": deq}


@pytest.mark.parametrize("bits", [4, (3, 2, 3, 4)])
def test_pallas_layer_on_quantized_experts_reads_them_as_stored(bits):
    """Equal to the layer on the dequantized weights (forward and input gradient), and no float
    [E, d, f] weight is computed on the way."""
    q, deq = _layer_case(bits, 7)
    x = jax.random.normal(jax.random.key(8), (24, 64))

    def loss(p, x):
        return jnp.sum(jmoe.moe_layer(p, x, CFG)[0] ** 2)

    y_q = jax.jit(lambda p, x: jmoe.moe_layer(p, x, CFG)[0])(q, x)
    y_f = jax.jit(lambda p, x: jmoe.moe_layer(p, x, CFG)[0])(deq, x)
    np.testing.assert_allclose(np.asarray(y_q), np.asarray(y_f), rtol=1e-5, atol=1e-5)
    g_q = jax.jit(jax.grad(loss, argnums=1))(q, x)
    g_f = jax.jit(jax.grad(loss, argnums=1))(deq, x)
    np.testing.assert_allclose(np.asarray(g_q), np.asarray(g_f), rtol=1e-4, atol=1e-5)
    jaxpr = jax.make_jaxpr(lambda p, x: jmoe.moe_layer(p, x, CFG)[0])(q, x).jaxpr
    shapes = {tuple(v.aval.shape) for e in jaxpr.eqns for v in e.outvars if v.aval.dtype == jnp.float32}
    assert not shapes & {(4, 64, 128), (4, 128, 64), (64, 128), (128, 64)}


def test_width_classes_regroup_experts_by_width():
    q, _ = _layer_case((3, 2, 3, 4), 9)
    rank, params = width_classes(q["experts"])
    # widths sorted (2, 3, 4): expert 1 first, then experts 0 and 2, then expert 3
    np.testing.assert_array_equal(np.asarray(rank), [1, 0, 2, 3])
    assert [(first, w.bits, w.shape[0]) for first, w in params["w_up"].parts] == [(0, 2, 1), (1, 3, 2), (3, 4, 1)]
    assert all(isinstance(w, QuantizedArray) for _, w in params["w_down"].parts)
    one, _ = _layer_case(4, 9)
    assert width_classes(ExpertList.split(one["experts"])) is None


def test_serving_keeps_mixed_widths_as_stored():
    """The stacked serving layout (GPU and TPU) would dequantize experts of several widths; it
    keeps them as a list, which the GPU path runs width by width."""
    from jmoe.infer.forward import serving_params
    from jmoe.nn import init_lm, preset

    model = preset("tiny")["model"]
    params = init_lm(jax.random.key(0), model)
    layers = dict(params["layers"])
    for i, name in enumerate(sorted(layers)):
        experts = layers[name]["moe"]["experts"]
        E = experts["w_up"].shape[0]
        widths = [4] * E if i else [2, 3] * (E // 2)  # layer 0 mixed, the others one width
        layers[name] = {**layers[name], "moe": {**layers[name]["moe"], "experts": ExpertList(
            [{n: quantize_rtn(w[e], widths[e], 64) for n, w in experts.items()} for e in range(E)])}}
    served = serving_params({**params, "layers": layers}, model, "stacked")["layers"]
    first, *others = sorted(served)
    assert isinstance(served[first]["moe"]["experts"], ExpertList)
    assert all(isinstance(served[n]["moe"]["experts"]["w_up"], QuantizedArray) for n in others)


def test_qgmm_lowers_for_cuda():
    S = jax.ShapeDtypeStruct
    for bits in (3, 4):
        q = quantize_rtn(jnp.zeros((8, 256, 384)), bits, 64)
        qs = jax.tree.map(lambda a: S(a.shape, jnp.bfloat16 if a.dtype == jnp.float32 else a.dtype), q)
        fn = jax.grad(lambda a, q, s: jnp.sum(qgmm(a, q, s, backend="gpu", interpret=False).astype(jnp.float32)))
        args = (S((512, 256), jnp.bfloat16), qs, S((8,), jnp.int32))
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text and "jmoe_qgmm" in text
