"""multislerp, nuslerp, arcee_fusion, ram and ramplus_tl against numpy transcriptions of
mergekit's formulas (mergekit/merge_methods/{multislerp,nuslerp,arcee_fusion,ram}.py), and
varm against FuseChat's VaRM scripts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import merge
from jmoe.merge import MergeError


def mk_multislerp(tensors, weight, base=None, normalize=True, eps=1e-8):
    t = np.stack(tensors).astype(np.float64)
    if base is not None:
        t = t - base
    flat = t.reshape(len(tensors), -1)
    w = np.asarray(weight, np.float64)
    w = w / w.sum() if normalize else w
    norms = np.linalg.norm(flat, axis=-1, keepdims=True)
    unit = flat / (norms + eps)
    mean = (unit * w[:, None]).sum(0)
    mean = mean / np.linalg.norm(mean)
    tangent = unit - (unit * mean).sum(-1, keepdims=True) * mean
    tr = (tangent * w[:, None]).sum(0)
    tn = np.linalg.norm(tr) + eps
    res = (mean * np.cos(tn) + tr * (np.sin(tn) / tn)) * (norms[:, 0] * w).sum()
    res = res.reshape(t.shape[1:])
    return res + base if base is not None else res


def mk_nuslerp(t, v0, v1, row_wise=False, flatten=True, eps=1e-8):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = np.swapaxes(v0, 0, -1), np.swapaxes(v1, 0, -1)
    nz = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-7)
    cos = np.sum(nz(v0) * nz(v1), axis=-1, keepdims=True)
    theta = np.arccos(np.clip(cos, -1, 1))
    sin = np.sin(theta)
    res = (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / sin
    colinear = (np.abs(sin) < eps).squeeze(-1)
    res[colinear] = (1 - t) * v0[colinear] + t * v1[colinear]
    if row_wise and not flatten:
        res = np.swapaxes(res, 0, -1)
    return res.reshape(shape)


def mk_arcee_fusion(base, model):
    diff = np.abs(model - base)
    sm = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
    p, q = sm(model) + 1e-8, sm(base) + 1e-8
    imp = diff * np.sum(p * np.log(p / q), axis=-1)[..., None]
    s = np.sort(imp.reshape(-1))
    q1, med, q3 = (s[int(np.float32(q) * (s.size - 1))] for q in (0.25, 0.5, 0.75))
    return base + (model - base) * (imp >= med + 1.5 * (q3 - q1))


def mk_ram(tensors, base, epsilon=1e-5, plus=None):
    tv = np.stack([t - base for t in tensors]).reshape(len(tensors), -1)
    nz = np.abs(tv) > epsilon
    counts = nz.sum(0, keepdims=True)
    overlap, unique = counts > 1, counts == 1
    tvz = tv * nz
    lam = np.ones((len(tensors), 1))
    if plus is not None:
        r, alpha = plus
        rho = (nz & overlap).sum(1) / np.maximum((nz & unique).sum(1), epsilon)
        lam = (1 + r * np.clip(rho, 0, alpha))[:, None]
    merged = (tvz * unique * lam + tvz * overlap / np.maximum(counts, 1)).sum(0)
    return base + merged.reshape(base.shape)


RNG = np.random.default_rng(0)
BASE = {"w": RNG.standard_normal((6, 5)).astype(np.float32), "b": RNG.standard_normal(5).astype(np.float32)}
MODELS = [{k: v + 0.3 * RNG.standard_normal(v.shape).astype(np.float32) for k, v in BASE.items()} for _ in range(3)]
J = lambda t: jax.tree.map(jnp.asarray, t)


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp(with_base):
    w = [0.5, 1.0, 0.25]
    out = merge.multislerp(J(BASE) if with_base else None, [J(m) for m in MODELS], weights=w)
    for k in BASE:
        want = mk_multislerp([m[k] for m in MODELS], w, BASE[k] if with_base else None)
        np.testing.assert_allclose(out[k], want, rtol=1e-4, atol=1e-5, err_msg=k)
    one = merge.multislerp(None, [J(MODELS[0])], weights=1.0)
    np.testing.assert_array_equal(one["w"], MODELS[0]["w"])
    # two antipodal tensors of equal weight: their weighted sum
    a = {"w": jnp.ones((2, 3))}
    out = merge.multislerp(None, [a, {"w": -a["w"]}], weights=[1.0, 1.0])
    np.testing.assert_allclose(out["w"], 0.0, atol=1e-6)
    with pytest.raises(MergeError, match="cancel out"):
        merge.multislerp(None, [a, {"w": -a["w"]}, {"w": jnp.zeros((2, 3))}], weights=[1.0, 1.0, 1.0])


@pytest.mark.parametrize("row_wise, flatten", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(row_wise, flatten, with_base):
    w = [0.3, 0.9]
    base = J(BASE) if with_base else None
    out = merge.nuslerp(base, [J(m) for m in MODELS[:2]], weights=w, row_wise=row_wise, flatten=flatten)
    t = w[1] / sum(w)
    for k in BASE:
        b = BASE[k].astype(np.float64) if with_base else 0.0
        v0, v1 = MODELS[0][k] - b, MODELS[1][k] - b
        want = b + mk_nuslerp(t, v0.astype(np.float64), v1.astype(np.float64), row_wise, flatten)
        np.testing.assert_allclose(out[k], want, rtol=1e-4, atol=1e-5, err_msg=k)
    # colinear rows are interpolated linearly
    a = {"w": jnp.ones((2, 3))}
    out = merge.nuslerp(None, [a, {"w": 3 * a["w"]}], weights=[1.0, 1.0], flatten=False)
    np.testing.assert_allclose(out["w"], 2.0, rtol=1e-6)
    with pytest.raises(MergeError, match="exactly two"):
        merge.nuslerp(None, [J(m) for m in MODELS], weights=1.0)


def test_arcee_fusion():
    out = merge.arcee_fusion(J(BASE), [J(MODELS[0])])
    for k in BASE:
        want = mk_arcee_fusion(BASE[k].astype(np.float64), MODELS[0][k].astype(np.float64))
        np.testing.assert_allclose(out[k], want, rtol=1e-5, atol=1e-6, err_msg=k)
    # small changes everywhere, large ones in two rows: only those outliers are taken
    base = RNG.standard_normal((32, 16)).astype(np.float32)
    model = base + 0.01 * RNG.standard_normal(base.shape).astype(np.float32)
    model[[3, 17], :4] += 2.0
    got = np.asarray(merge.arcee_fusion({"w": jnp.asarray(base)}, [{"w": jnp.asarray(model)}])["w"])
    taken = got == model
    assert taken[[3, 17], :4].all() and taken.sum() < 0.25 * taken.size
    # float32 rounding decides entries whose importance is within a hair of the fence
    from jmoe.merge.importance_fusion import fence, importance

    imp = np.asarray(importance(jnp.asarray(model), jnp.asarray(base)))
    clear = np.abs(imp - float(fence(jnp.asarray(imp)))) > 1e-2 * float(fence(jnp.asarray(imp)))
    want = mk_arcee_fusion(base.astype(np.float64), model.astype(np.float64))
    np.testing.assert_allclose(got[clear], want[clear], atol=1e-6)


@pytest.mark.parametrize("method, plus", [("ram", None), ("ramplus_tl", (0.1, 0.2)), ("ramplus_tl", (0.5, 3.0))])
def test_ram(method, plus):
    # sparse task vectors, so that entries are changed by one, several or no models
    models = [{k: np.where(RNG.random(v.shape) < 0.4, m[k], v) for k, v in BASE.items()} for m in MODELS]
    kwargs = {} if plus is None else {"r": plus[0], "alpha": plus[1]}
    out = getattr(merge, method)(J(BASE), [J(m) for m in models], **kwargs)
    for k in BASE:
        want = mk_ram([m[k].astype(np.float64) for m in models], BASE[k].astype(np.float64), plus=plus)
        np.testing.assert_allclose(out[k], want, rtol=1e-5, atol=1e-6, err_msg=k)
    with pytest.raises(MergeError, match="base is required"):
        merge.ram(None, [J(m) for m in models])


def test_optional_base_in_a_configuration(tmp_path):
    from jmoe.merge.mergekit import parse_config

    for m in ("a", "b"):
        (tmp_path / m).mkdir()
    plan = parse_config("merge_method: nuslerp\nmodels: [{model: a, parameters: {weight: 1}}, "
                        "{model: b, parameters: {weight: 2}}]", root=tmp_path)
    assert plan.base is None and plan.spec.optional_base
    with pytest.raises(MergeError, match="needs base_model"):
        parse_config("merge_method: ram\nmodels: [{model: a}, {model: b}]", root=tmp_path)
    with pytest.raises(MergeError, match="exactly 2 models"):
        parse_config("merge_method: nuslerp\nmodels: [{model: a, parameters: {weight: 1}}]", root=tmp_path)


def reference_varm(tensors, base, variation="square", temp=None):
    """FuseChat's VaRM at matrix granularity, from its analysis (variation per parameter) and
    merge (weights normalised or softmaxed, uniform when a model left the matrix unchanged)."""
    d = [t - base for t in tensors]
    v = np.array([np.sum(x ** 2 if variation == "square" else np.abs(x)) / x.size for x in d])
    w = np.exp(v / temp) / np.exp(v / temp).sum() if temp else v / v.sum()
    if np.any(v == 0):
        w = np.ones(len(tensors)) / len(tensors)
    return sum(wi * t for wi, t in zip(w, tensors))


@pytest.mark.parametrize("variation, temperature", [("square", None), ("abs", None), ("square", 0.05)])
def test_varm(variation, temperature):
    models = [dict(m, b=BASE["b"].copy()) if i == 2 else m for i, m in enumerate(MODELS)]  # one model leaves b alone
    out = merge.varm(J(BASE), [J(m) for m in models], variation=variation, temperature=temperature)
    for k in BASE:
        want = reference_varm([m[k].astype(np.float64) for m in models], BASE[k].astype(np.float64), variation,
                              temperature)
        np.testing.assert_allclose(out[k], want, rtol=1e-5, atol=1e-6, err_msg=k)
    with pytest.raises(MergeError, match="variation"):
        merge.varm(J(BASE), [J(m) for m in MODELS], variation="cube")
