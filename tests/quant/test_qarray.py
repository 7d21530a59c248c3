"""Quantized expert weights: packing, error bounds, HQQ, and every dispatch on quantized experts
equal to the same layer on the dequantized float experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe.experts import ExpertList
from jmoe.quant import (BITS, QuantizedArray, pack, param_bytes, quantize_expert_weights, quantize_hqq,
                        quantize_layer_experts, quantize_lm_experts, quantize_rtn, unpack)


@pytest.mark.parametrize("bits", BITS)
def test_pack_round_trip(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, (3, 4, 24)).astype(np.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 4, 24 * bits // 8) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(unpack(packed, bits)), codes)


def test_pack_needs_multiples_of_eight():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(np.zeros((2, 12), np.uint8), 4)


@pytest.mark.parametrize("bits", BITS)
def test_round_to_nearest_error_is_at_most_half_a_step(bits):
    w = jax.random.normal(jax.random.key(0), (2, 64, 16))
    q = quantize_rtn(w, bits, group_size=32)
    err = jnp.abs(q.dequantize() - w).reshape(2, 2, 32, 16)
    assert bool(jnp.all(err <= q.scale[:, :, None, :] / 2 + 1e-6))
    assert q.shape == w.shape and q.dtype == w.dtype
    assert q.nbytes == w.size * bits // 8 + 2 * 2 * 2 * 16 * 4  # codes + scales + zeros (float32)


def test_constant_groups_are_exact():
    w = jnp.ones((32, 8)) * 0.37
    np.testing.assert_allclose(np.asarray(quantize_rtn(w, 2, 32).dequantize()), np.asarray(w), atol=1e-6)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_hqq_is_no_worse_than_round_to_nearest_in_any_group(bits):
    w = jax.random.t(jax.random.key(1), 3.0, (2, 128, 32))  # heavy tails: where HQQ's lp error helps
    rtn, hqq = quantize_rtn(w, bits, 64), quantize_hqq(w, bits, 64)
    group_err = lambda q: jnp.abs(q.dequantize() - w).reshape(2, 2, 64, 32).mean(2)  # noqa: E731
    assert bool(jnp.all(group_err(hqq) <= group_err(rtn) + 1e-6))
    assert float(group_err(hqq).mean()) < 0.97 * float(group_err(rtn).mean())


def test_slicing_the_expert_axis_slices_codes_scales_and_zeros():
    w = jax.random.normal(jax.random.key(2), (4, 64, 16))
    q = quantize_rtn(w, 3, 32)
    one = jax.tree.map(lambda a: a[2], q)
    assert isinstance(one, QuantizedArray) and one.shape == (64, 16)
    np.testing.assert_array_equal(np.asarray(one.dequantize()), np.asarray(q.dequantize()[2]))
    e = jnp.int32(1)
    dyn = jax.jit(lambda q, e: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, e, keepdims=False), q).dequantize())
    np.testing.assert_array_equal(np.asarray(dyn(q, e)), np.asarray(q.dequantize()[1]))


def test_bad_input_names_what_is_wrong():
    w = jnp.zeros((2, 48, 16))
    with pytest.raises(ValueError, match="bits=5"):
        quantize_rtn(w, 5)
    with pytest.raises(ValueError, match="group_size=32"):
        quantize_rtn(w, 4, 32)
    experts = {"w_up": w}
    with pytest.raises(ValueError, match="unknown; known: rtn, hqq"):
        quantize_expert_weights(experts, 4, group_size=16, method="gptqq")
    q = quantize_expert_weights(experts, 4, group_size=16)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_expert_weights(q, 4, group_size=16)
    for call, message in [
        (lambda: quantize_rtn(jnp.arange(128, dtype=jnp.int32).reshape(16, 8), 8, 8), "floating-point weight"),
        (lambda: quantize_rtn(w, 4.0, 16), "bits=4.0 is not supported"),
        (lambda: quantize_rtn(w, 4, 0), "group_size=0 must be an integer >= 1"),
        (lambda: quantize_expert_weights(experts, 4, group_size=0), "group_size=0"),
        (lambda: quantize_layer_experts(experts, [2.7, 2.2], group_size=16), "bits=2.7 is not supported"),
        (lambda: quantize_layer_experts(experts, 3.0, group_size=16), "bits=3.0 must be one integer width"),
        (lambda: quantize_layer_experts(experts, 4, group_size=16, method="gptq", hessians={}), "hessians has no 'h_in'"),
        (lambda: quantize_layer_experts(experts, 4, group_size=16, method="gptq",
                                        hessians={"h_in": jnp.zeros((2, 16, 16))}), "hessians\\['h_in'\\] has shape"),
        (lambda: quantize_lm_experts({"w": w}, 4), "params must be a language model's parameters"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()


CFG = jmoe.MoEConfig(num_experts=8, top_k=2, d_model=64, d_ff=128)


def _layer(dispatch, **changes):
    return CFG.replace(dispatch=dispatch, **changes)


@pytest.mark.parametrize("dispatch,layout", [("dropless", "stacked"), ("dropless", "split"), ("capacity", "stacked"),
                                             ("gather", "stacked"), ("dense", "stacked")])
def test_layer_on_quantized_experts_equals_the_dequantized_layer(dispatch, layout):
    cfg = _layer(dispatch)
    params = jmoe.init_moe(jax.random.key(3), cfg)
    q = {**params, "experts": quantize_expert_weights(params["experts"], 4, group_size=32)}
    deq = {**params, "experts": {n: w.dequantize() for n, w in q["experts"].items()}}
    if layout == "split":
        q = {**q, "experts": ExpertList.split(q["experts"])}
    x = jax.random.normal(jax.random.key(4), (2, 12, 64))
    y_q, _ = jax.jit(lambda p, x: jmoe.moe_layer(p, x, cfg))(q, x)
    y_f, _ = jax.jit(lambda p, x: jmoe.moe_layer(p, x, cfg))(deq, x)
    np.testing.assert_allclose(np.asarray(y_q), np.asarray(y_f), rtol=1e-5, atol=1e-5)


def test_lm_experts_quantized_only_and_bytes_counted():
    from jmoe.nn import init_lm, lm_apply, preset

    model = preset("tiny")["model"]
    params = init_lm(jax.random.key(0), model)
    q = quantize_lm_experts(params, 4, group_size=64, method="rtn")
    for name, layer in q["layers"].items():
        assert all(isinstance(w, QuantizedArray) for w in layer["moe"]["experts"].values())
        np.testing.assert_array_equal(np.asarray(layer["attn"]["wq"]), np.asarray(params["layers"][name]["attn"]["wq"]))
    expert = sum(w.size * 4 for layer in params["layers"].values() for w in layer["moe"]["experts"].values())
    packed = sum(w.nbytes for layer in q["layers"].values() for w in layer["moe"]["experts"].values())
    assert param_bytes(q) == param_bytes(params) - expert + packed
    assert packed < expert / 6  # 4 bits + a float scale and zero per 64 weights
    tokens = jnp.arange(2 * 16, dtype=jnp.int32).reshape(2, 16) % 256
    logits_q, _ = jax.jit(lambda p: lm_apply(p, tokens, model))(q)
    assert bool(jnp.all(jnp.isfinite(logits_q)))


def _shapes(jaxpr, out=None):
    """Every (shape, dtype) a jaxpr and its sub-jaxprs compute."""
    out = set() if out is None else out
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            out.add((tuple(v.aval.shape), str(v.aval.dtype)))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _shapes(inner, out)
    return out


@pytest.mark.parametrize("layout", ["stacked", "split"])
def test_dropless_dequantizes_one_expert_at_a_time(layout):
    cfg = _layer("dropless")
    params = jmoe.init_moe(jax.random.key(5), cfg)
    experts = quantize_expert_weights(params["experts"], 4, group_size=32)
    q = {**params, "experts": ExpertList.split(experts) if layout == "split" else experts}
    x = jax.random.normal(jax.random.key(6), (16, 64))
    shapes = _shapes(jax.make_jaxpr(lambda p, x: jmoe.moe_layer(p, x, cfg)[0])(q, x).jaxpr)
    assert ((64, 128), "float32") in shapes  # one expert's w_up, dequantized
    assert not any(s[0] in ((8, 64, 128), (8, 128, 64)) and s[1] == "float32" for s in shapes)


@pytest.mark.parametrize("dispatch", ["dropless", "gather", "capacity"])
def test_experts_with_different_bit_widths(dispatch):
    """A mixed-precision layer: one bit width per expert, in the `ExpertList` layout (a dispatch
    that needs stacked weights gets them dequantized)."""
    cfg = _layer(dispatch, num_experts=4)
    params = jmoe.init_moe(jax.random.key(7), cfg)
    bits = (2, 3, 4, 8)
    experts = ExpertList([{n: quantize_rtn(w[e], bits[e], 32) for n, w in params["experts"].items()} for e in range(4)])
    deq = {n: jnp.stack([experts.experts[e][n].dequantize() for e in range(4)]) for n in params["experts"]}
    x = jax.random.normal(jax.random.key(8), (12, 64))
    y_q, _ = jax.jit(lambda p, x: jmoe.moe_layer(p, x, cfg))({**params, "experts": experts}, x)
    y_f, _ = jax.jit(lambda p, x: jmoe.moe_layer(p, x, cfg))({**params, "experts": deq}, x)
    np.testing.assert_allclose(np.asarray(y_q), np.asarray(y_f), rtol=1e-5, atol=1e-5)


def test_input_gradient_through_quantized_experts():
    """Gradients flow to the tokens (and to anything upstream, e.g. adapters) through frozen
    quantized experts, as through their dequantized weights."""
    cfg = _layer("dropless")
    params = jmoe.init_moe(jax.random.key(9), cfg)
    q = {**params, "experts": quantize_expert_weights(params["experts"], 4, group_size=32)}
    deq = {**params, "experts": {n: w.dequantize() for n, w in q["experts"].items()}}
    x = jax.random.normal(jax.random.key(10), (12, 64))
    grad = lambda p: jax.jit(jax.grad(lambda x: jnp.sum(jmoe.moe_layer(p, x, cfg)[0] ** 2)))(x)  # noqa: E731
    np.testing.assert_allclose(np.asarray(grad(q)), np.asarray(grad(deq)), rtol=1e-4, atol=1e-5)
