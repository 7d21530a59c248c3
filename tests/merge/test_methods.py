"""Every merge method against a direct numpy implementation, plus its algebraic properties."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import merge
from jmoe.merge import MergeError
from jmoe.merge.tree import leaf_key, leaves_with_paths


def make_tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32) * scale)
    return {
        "embed": {"w": f(6, 4)},
        "layers": {str(i): {"w": f(4, 5), "b": f(5)} for i in range(3)},
        "step": jnp.asarray(seed, jnp.int32),
    }


BASE = make_tree(0)
MODELS = [jax.tree.map(lambda b, d: b + d if jnp.issubdtype(b.dtype, jnp.floating) else b, BASE, make_tree(s, 0.1))
          for s in (1, 2, 3)]


def np_leaves(tree):
    return {p: np.asarray(x, np.float64) for p, x in leaves_with_paths(tree)}


def check(out, ref_fn, atol=1e-5, models=MODELS, base=BASE):
    """Compare every floating leaf of `out` with ref_fn(base_leaf, [model leaves], path)."""
    b = np_leaves(base) if base is not None else None
    ms = [np_leaves(m) for m in models]
    for path, got in leaves_with_paths(out):
        if path == "step":
            assert int(got) == int((base or models[0])["step"])
            continue
        want = ref_fn(b[path] if b else None, [m[path] for m in ms], path)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=atol, rtol=1e-5, err_msg=path)


def topk_mask(d, density):
    k = int(density * d.size)
    order = np.argsort(-np.abs(d).ravel(), kind="stable")
    mask = np.zeros(d.size, bool)
    mask[order[:k]] = True
    return mask.reshape(d.shape)


def np_gta(b, xs, sparsify, w, lam, consensus, normalize):
    deltas = [sparsify(x - b) for x in xs]
    wd = np.stack([wi * d for wi, d in zip(w, deltas)])
    wv = np.asarray(w).reshape((-1,) + (1,) * (wd.ndim - 1))
    if consensus:
        total = wd.sum(0) if consensus == "sum" else np.sign(wd).sum(0)
        elected = np.where(total >= 0, 1.0, -1.0)
        mask = np.sign(wd) == elected
        mixed = np.where(mask, wd, 0).sum(0)
        div = np.where(mask, wv, 0).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = np.full_like(mixed, wv.sum())
    if normalize:
        mixed = mixed / div
    return b + lam * mixed


# ------------------------------------------------------------------------ references


def test_linear_and_task_arithmetic():
    w = [0.2, 0.3, 0.5]
    check(merge.linear(MODELS, weights=w), lambda b, xs, p: sum(wi * x for wi, x in zip(w, xs)) / sum(w), base=None)
    check(merge.linear(MODELS, weights=w, normalize=False), lambda b, xs, p: sum(wi * x for wi, x in zip(w, xs)), base=None)
    check(merge.task_arithmetic(BASE, MODELS, weights=w, lam=0.7),
          lambda b, xs, p: b + 0.7 * sum(wi * (x - b) for wi, x in zip(w, xs)))


@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_ties_per_tensor(consensus):
    w = [1.0, 0.5, 2.0]
    out = merge.ties(BASE, MODELS, density=0.4, weights=w, lam=0.9, consensus=consensus)
    check(out, lambda b, xs, p: np_gta(b, xs, lambda d: np.where(topk_mask(d, 0.4), d, 0), w, 0.9, consensus, True))


def test_ties_global_with_disjoint_sum():
    density = 0.3
    deltas = [np.concatenate([(np_leaves(m)[p] - np_leaves(BASE)[p]).ravel() for p in np_leaves(BASE) if p != "step"])
              for m in MODELS]
    thresholds = [np.sort(np.abs(d))[::-1][int(density * d.size) - 1] for d in deltas]
    out = merge.ties(BASE, MODELS, density=density, scope="global", disjoint="sum", lam=0.5)
    idx = iter(range(10**6))

    def ref(b, xs, p):
        ds = [np.where(np.abs(x - b) >= t, x - b, 0) for x, t in zip(xs, thresholds)]
        return np_gta(b, [b + d for d in ds], lambda d: d, [1, 1, 1], 0.5, "sum", False)

    del idx
    check(out, ref)


def test_ties_sign_election_tie_goes_to_plus():
    base = {"w": jnp.zeros((3,))}
    models = [{"w": jnp.array([1.0, 2.0, -1.0])}, {"w": jnp.array([-1.0, 1.0, 0.5])}]
    out = merge.ties(base, models, density=1.0)
    # entry 0: +1 and -1 sum to 0 -> +1 elected -> only the +1 survives (mean over 1 model)
    # entry 1: both positive -> mean 1.5; entry 2: sum -0.5 -> negative elected -> -1
    np.testing.assert_allclose(out["w"], [1.0, 1.5, -1.0])


def test_dare_properties():
    key = jax.random.key(7)
    out = merge.dare(BASE, MODELS[:1], density=0.5, key=key)
    again = merge.dare(BASE, MODELS[:1], density=0.5, key=key)
    other = merge.dare(BASE, MODELS[:1], density=0.5, key=jax.random.key(8))
    b, m, o = np_leaves(BASE), np_leaves(MODELS[0]), np_leaves(out)
    kept_fraction = []
    for p in o:
        if p == "step":
            continue
        d, got = m[p] - b[p], o[p] - b[p]
        kept = got != 0
        np.testing.assert_allclose(got[kept], d[kept] / 0.5, rtol=1e-5)  # inverse rescale
        kept_fraction.append(kept.mean())
    assert 0.3 < np.mean(kept_fraction) < 0.7
    jax.tree.map(np.testing.assert_array_equal, out, again)  # reproducible
    assert not np.allclose(other["layers"]["0"]["w"], out["layers"]["0"]["w"])
    # the mask is the Bernoulli draw of the leaf's own key
    d = MODELS[0]["layers"]["1"]["w"] - BASE["layers"]["1"]["w"]
    keep = jax.random.bernoulli(jax.random.split(leaf_key(key, "layers/1/w"), 1)[0], 0.5, d.shape)
    np.testing.assert_allclose(out["layers"]["1"]["w"], BASE["layers"]["1"]["w"] + jnp.where(keep, d / 0.5, 0), rtol=1e-6)
    l1 = merge.dare(BASE, MODELS[:1], density=0.3, key=key, rescale="l1")
    for p, x in np_leaves(l1).items():
        if p != "step":
            np.testing.assert_allclose(np.abs(x - b[p]).sum(), np.abs(m[p] - b[p]).sum(), rtol=1e-4)


def np_breadcrumbs(d, density, gamma):
    n = d.size
    keep_n, n_top = int(density * n), int(gamma * n)
    n_bot = n - keep_n - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    order = np.argsort(np.abs(d).ravel(), kind="stable")
    mask = np.zeros(n, bool)
    mask[order[n_bot:n - n_top]] = True
    return np.where(mask.reshape(d.shape), d, 0)


@pytest.mark.parametrize("density, gamma", [(0.5, 0.1), (0.8, 0.01), (0.6, 0.5), (0.9, 0.0)])
def test_breadcrumbs_edges(density, gamma):
    out = merge.breadcrumbs(BASE, MODELS, density=density, gamma=gamma)
    check(out, lambda b, xs, p: np_gta(b, xs, lambda d: np_breadcrumbs(d, density, gamma), [1, 1, 1], 1.0, None, False))
    out = merge.breadcrumbs_ties(BASE, MODELS, density=density, gamma=gamma)
    check(out, lambda b, xs, p: np_gta(b, xs, lambda d: np_breadcrumbs(d, density, gamma), [1, 1, 1], 1.0, "sum", False))


def test_della():
    key = jax.random.key(3)
    big_b = {"w": jnp.zeros((64, 200))}
    big_m = [{"w": jax.random.normal(jax.random.key(1), (64, 200))}]
    out = merge.della(big_b, big_m, density=0.5, epsilon=0.3, key=key, rescale=None)
    d = np.asarray(big_m[0]["w"])
    kept = np.asarray(out["w"]) != 0
    ranks = np.argsort(np.argsort(np.abs(d), axis=1), axis=1)
    small, large = kept[ranks < 40].mean(), kept[ranks >= 160].mean()
    assert 0.15 < small < 0.3 and 0.7 < large < 0.85  # density -/+ epsilon at the ends
    out = merge.della_linear(big_b, big_m, density=0.5, epsilon=0.2, key=key, rescale="l1")
    np.testing.assert_allclose(np.abs(np.asarray(out["w"])).sum(), np.abs(d).sum(), rtol=1e-4)
    with pytest.raises(ValueError, match="density"):
        merge.della(big_b, big_m, density=0.1, epsilon=0.2, key=key)


def np_slerp(v0, v1, t, thr=0.9995):
    u0, u1 = v0 / np.linalg.norm(v0), v1 / np.linalg.norm(v1)
    dot = np.sum(u0 * u1)
    if abs(dot) > thr:
        return (1 - t) * v0 + t * v1
    th = np.arccos(dot)
    return np.sin((1 - t) * th) / np.sin(th) * v0 + np.sin(t * th) / np.sin(th) * v1


def test_slerp_nearswap_karcher():
    other = make_tree(9)
    check(merge.slerp(BASE, [other], t=0.3), lambda b, xs, p: np_slerp(b, xs[0], 0.3), models=[other])
    for t, end in [(0.0, BASE), (1.0, other)]:
        out = merge.slerp(BASE, [other], t=t)
        jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, atol=1e-5), out, {**end, "step": BASE["step"]})
    same = merge.slerp(BASE, [BASE], t=0.4)  # parallel: the lerp fallback
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, atol=1e-6), same, BASE)

    def np_nearswap(b, x, t):
        diff = np.abs(b - x)
        w = np.clip(np.where(diff > 0, t / np.where(diff > 0, diff, 1), 1), 0, 1)
        return w * x + (1 - w) * b

    check(merge.nearswap(BASE, MODELS[:1], t=0.05), lambda b, xs, p: np_nearswap(b, xs[0], 0.05), models=MODELS[:1])

    def np_karcher(xs, iters=10, tol=1e-5):
        x = np.stack([v.ravel() for v in xs])
        norms = np.linalg.norm(x, axis=1)
        u = x / norms[:, None]
        a = np.full(len(xs), 1 / len(xs))
        m = (a[:, None] * u).sum(0)
        m /= np.linalg.norm(m)
        for _ in range(iters):
            cos = np.clip(u @ m, -1, 1)
            th = np.arccos(cos)
            coef = np.where(th > tol, th / np.sin(np.where(th > tol, th, 1)), 0)
            T = ((a * coef)[:, None] * (u - cos[:, None] * m)).sum(0)
            tn = np.linalg.norm(T)
            if tn < tol:
                break
            m = np.cos(tn) * m + np.sin(tn) * T / tn
            m /= np.linalg.norm(m)
        return ((a * norms).sum() * m).reshape(xs[0].shape)

    check(merge.karcher(MODELS), lambda b, xs, p: np_karcher(xs), atol=1e-4, base=None)


def test_model_stock_and_sce():
    def np_stock(b, xs):
        offs = [(x - b).ravel() for x in xs]
        cos = np.mean([np.dot(offs[i], offs[j]) / max(np.linalg.norm(offs[i]) * np.linalg.norm(offs[j]), 1e-6)
                       for i in range(len(offs)) for j in range(i + 1, len(offs))])
        t = len(xs) * cos / (1 + (len(xs) - 1) * cos)
        return t * np.mean(xs, 0) + (1 - t) * b

    check(merge.model_stock(BASE, MODELS), lambda b, xs, p: np_stock(b, xs), atol=1e-4)
    twins = [MODELS[0], MODELS[0]]
    out = merge.model_stock(BASE, twins)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, atol=1e-5), out, MODELS[0])
    with pytest.raises(MergeError, match="at least 2"):
        merge.model_stock(BASE, MODELS[:1])

    def np_sce(b, xs, frac):
        d = np.stack([x - b for x in xs])
        if frac < 1:
            var = d.var(0)
            k = int(frac * np.count_nonzero(var))
            order = np.argsort(-np.abs(var).ravel(), kind="stable")
            keep = np.zeros(var.size, bool)
            keep[order[:k]] = True
            d = d * keep.reshape(var.shape)
        w = (d.reshape(len(xs), -1) ** 2).sum(1) / d[0].size
        w = w / w.sum()
        erase = np.sign(d) == np.where(d.sum(0) >= 0, 1, -1)
        wv = w.reshape((-1,) + (1,) * (d.ndim - 1))
        num = np.where(erase, wv * d, 0).sum(0)
        den = np.where(erase, wv, 0).sum(0)
        return b + num / np.where(den == 0, 1, den)

    check(merge.sce(BASE, MODELS, select_topk=0.5), lambda b, xs, p: np_sce(b, xs, 0.5), atol=1e-5)
    check(merge.sce(BASE, MODELS), lambda b, xs, p: np_sce(b, xs, 1.0), atol=1e-5)


def test_fisher_and_regmean():
    fishers = [jax.tree.map(lambda x: jnp.abs(x) + 0.1 if jnp.issubdtype(x.dtype, jnp.floating) else x, make_tree(s))
               for s in (11, 12, 13)]
    fl = [np_leaves(f) for f in fishers]
    norms = [np.sqrt(sum((v ** 2).sum() for p, v in f.items() if p != "step")) for f in fl]
    inv = np.array([1 / (n + 1e-6) for n in norms])
    c = (1 / 3) * inv / inv.sum()

    def ref(b, xs, p):
        fs = [f[p] + 1e-6 for f in fl]
        return sum(ci * f * x for ci, f, x in zip(c, fs, xs)) / sum(ci * f for ci, f in zip(c, fs))

    check(merge.fisher(MODELS, fishers), ref, base=None)
    rng = np.random.default_rng(0)
    grams = []
    for _ in MODELS:
        X = rng.standard_normal((20, 4))
        grams.append({"layers/0/w": jnp.asarray(X.T @ X / 20, jnp.float32)})
    out = merge.regmean(MODELS, grams, alpha=0.6, ridge=0.0)
    G = [np.asarray(g["layers/0/w"], np.float64) for g in grams]
    Gs = [0.6 * g + 0.4 * np.diag(np.diag(g)) for g in G]
    W = [np_leaves(m)["layers/0/w"] for m in MODELS]
    want = np.linalg.solve(sum(Gs), sum(g @ w for g, w in zip(Gs, W)))
    np.testing.assert_allclose(out["layers"]["0"]["w"], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["layers"]["1"]["w"], np.mean([np_leaves(m)["layers/1/w"] for m in MODELS], 0), rtol=1e-5)


def test_tall_masks_consensus_and_pcb():
    b, ms = np_leaves(BASE), [np_leaves(m) for m in MODELS]
    masks = merge.tall_masks(BASE, MODELS, lam=0.4)
    out = merge.consensus(BASE, MODELS, k=2, lam=0.4, scale=0.8)
    for p in b:
        if p == "step":
            continue
        taus = [m[p] - b[p] for m in ms]
        mtl = sum(taus)
        want_masks = [np.abs(t) > 0.4 * np.abs(mtl - t) for t in taus]
        for mk, want in zip(masks, want_masks):
            np.testing.assert_array_equal(dict(leaves_with_paths(mk))[p], want)
        keep = sum(want_masks) >= 2
        np.testing.assert_allclose(dict(leaves_with_paths(out))[p], b[p] + 0.8 * np.where(keep, mtl, 0), atol=1e-5)

    # PCB against a direct numpy version over the flattened models
    paths = [p for p in b if p != "step"]
    tau = np.stack([np.concatenate([(m[p] - b[p]).ravel() for p in paths]) for m in ms])
    n, ratio, clip = 3, 0.2, 0.01

    def kth(v, k):
        return np.sort(v)[::-1][k - 1]

    N = tau.shape[1]
    lo = np.array([kth(np.abs(t), int(round((1 - clip) * N))) for t in tau])[:, None]
    hi = np.array([kth(np.abs(t), int(round(clip * N))) for t in tau])[:, None]
    a = np.clip(np.abs(tau), lo, hi)
    score = np.exp(n * ((a - lo) / (hi - lo)) ** 2) * np.tanh(tau * tau.sum(0))
    thr = np.array([kth(s, int(round(ratio * N))) for s in score])[:, None]
    s = (np.clip(score, thr, None) - thr) / (score.max(1, keepdims=True) - thr)
    merged = (np.sign(tau) * a * s).sum(0) / np.maximum(s.sum(0), 1e-12)
    got = merge.pcb(BASE, MODELS, ratio=ratio, clip=clip)
    gl = np_leaves(got)
    flat = np.concatenate([(gl[p] - b[p]).ravel() for p in paths])
    np.testing.assert_allclose(flat, merged, atol=1e-4)


def test_layer_swap():
    donor = make_tree(5)
    out = merge.layer_swap(BASE, donor, bottom=1, top=1)
    np.testing.assert_array_equal(out["layers"]["0"]["w"], donor["layers"]["0"]["w"])
    np.testing.assert_array_equal(out["layers"]["1"]["w"], BASE["layers"]["1"]["w"])
    np.testing.assert_array_equal(out["layers"]["2"]["b"], donor["layers"]["2"]["b"])
    np.testing.assert_array_equal(out["embed"]["w"], BASE["embed"]["w"])
    blend = merge.layer_swap(BASE, donor, bottom=1, transition=1)
    np.testing.assert_allclose(blend["layers"]["1"]["w"], 0.5 * (BASE["layers"]["1"]["w"] + donor["layers"]["1"]["w"]), rtol=1e-6)


# ---------------------------------------------------------------------- algebra


def test_algebraic_properties():
    same = [BASE, BASE, BASE]
    eq = lambda a, b: jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)
    for fn in [merge.linear, merge.karcher]:
        eq(fn(same), BASE)
    for fn in [partial(merge.ties, density=0.5), merge.task_arithmetic, partial(merge.breadcrumbs, density=0.7),
               merge.sce, partial(merge.dare, density=0.5, key=jax.random.key(0))]:
        eq(fn(BASE, same), BASE)  # merging identical models returns the model
    eq(merge.task_arithmetic(BASE, MODELS, lam=0.0), BASE)
    eq(merge.ties(BASE, MODELS[:1], density=1.0), merge.task_arithmetic(BASE, MODELS[:1]))
    eq(merge.dare(BASE, MODELS[:1], density=1.0, key=jax.random.key(0)), MODELS[0])


def test_per_leaf_filters_and_layer_gradients():
    out = merge.task_arithmetic(BASE, MODELS[:1], filter=r"layers/[12]/")
    np.testing.assert_array_equal(out["layers"]["0"]["w"], BASE["layers"]["0"]["w"])
    np.testing.assert_array_equal(out["embed"]["w"], BASE["embed"]["w"])
    np.testing.assert_allclose(out["layers"]["1"]["w"], MODELS[0]["layers"]["1"]["w"], rtol=1e-6)
    # a weight gradient over the 3 layers: 0, 0.5, 1 (embeddings take t = 0)
    out = merge.task_arithmetic(BASE, MODELS[:1], weights=[[0.0, 1.0]])
    for i, w in enumerate([0.0, 0.5, 1.0]):
        want = BASE["layers"][str(i)]["w"] + w * (MODELS[0]["layers"][str(i)]["w"] - BASE["layers"][str(i)]["w"])
        np.testing.assert_allclose(out["layers"][str(i)]["w"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["embed"]["w"], BASE["embed"]["w"])
    # conditional values by path
    out = merge.linear([BASE, MODELS[0]], weights=[[{"filter": "embed", "value": 1.0}, {"value": 0.0}], 1.0])
    np.testing.assert_allclose(out["embed"]["w"], 0.5 * (BASE["embed"]["w"] + MODELS[0]["embed"]["w"]), rtol=1e-6)
    np.testing.assert_allclose(out["layers"]["0"]["w"], MODELS[0]["layers"]["0"]["w"], rtol=1e-6)


def test_jit_and_flat_hf_dicts():
    f = jax.jit(partial(merge.ties, density=0.4))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), f(BASE, MODELS), merge.ties(BASE, MODELS, density=0.4))
    flat = lambda t: {"model.layers.%s.mlp.weight" % i: t["layers"][str(i)]["w"] for i in range(3)}
    out = merge.task_arithmetic(flat(BASE), [flat(m) for m in MODELS[:1]], weights=[[0.0, 1.0]])
    np.testing.assert_allclose(out["model.layers.2.mlp.weight"], MODELS[0]["layers"]["2"]["w"], rtol=1e-6)
    np.testing.assert_array_equal(out["model.layers.0.mlp.weight"], BASE["layers"]["0"]["w"])


def test_bad_inputs_name_the_leaf_and_argument():
    with pytest.raises(MergeError, match="at least 1"):
        merge.ties(BASE, [], density=0.5)
    bad_shape = jax.tree.map(lambda x: x, MODELS[0])
    bad_shape["layers"]["1"]["w"] = jnp.zeros((4, 6))
    with pytest.raises(MergeError, match=r"models\[1\]: leaf 'layers/1/w' has shape \(4, 6\)"):
        merge.task_arithmetic(BASE, [MODELS[0], bad_shape])
    bad_dtype = jax.tree.map(lambda x: x, MODELS[0])
    bad_dtype["embed"]["w"] = bad_dtype["embed"]["w"].astype(jnp.bfloat16)
    with pytest.raises(MergeError, match="embed/w.*dtype"):
        merge.linear([MODELS[0], bad_dtype])
    bad_tree = {k: v for k, v in MODELS[0].items() if k != "embed"}
    with pytest.raises(MergeError, match="different tree"):
        merge.task_arithmetic(BASE, [bad_tree])
    for density in (0.0, 1.5, -0.1):
        with pytest.raises(MergeError, match=r"density=.* at leaf 'embed/w'"):
            merge.ties(BASE, MODELS, density=density)
    with pytest.raises(MergeError, match="key"):
        merge.dare(BASE, MODELS, density=0.5, key=None)
    with pytest.raises(MergeError, match="exactly one"):
        merge.slerp(BASE, MODELS, t=0.5)


@pytest.mark.parametrize("call, message", [
    (lambda: merge.task_arithmetic(BASE, MODELS, weights=float("nan")), "weights=nan at leaf .* not a finite number"),
    (lambda: merge.slerp(BASE, MODELS[:1], t=float("inf")), "t=inf at leaf .* not a finite number"),
    (lambda: merge.multislerp(BASE, MODELS[:2], weights=[1.0, -1.0]), "weights sum to 0"),
    (lambda: merge.task_arithmetic(BASE, MODELS, filter="("), r"filter='\(' is not a regular expression"),
    (lambda: merge.task_arithmetic(BASE, MODELS, filter=3), "filter must be a regular expression .* got int"),
    (lambda: merge.task_arithmetic({"a": 1.0}, [{"a": 2.0}]), "base: leaf 'a' is a float, not an array"),
    (lambda: merge.dare(BASE, MODELS, density=0.5, key=0), "key must be a PRNG key .* got int 0"),
    (lambda: merge.karcher(MODELS, max_iter=-1), "max_iter=-1"),
    (lambda: merge.breadcrumbs(BASE, MODELS, density=0.5, gamma=-1.0), r"gamma=-1.0 at leaf .* must be in \[0, 1\]"),
    (lambda: merge.sce(BASE, MODELS, select_topk=-0.5), r"select_topk=-0.5 at leaf .* must be in \[0, 1\]"),
    (lambda: merge.ram(BASE, MODELS, epsilon=-1.0), "epsilon=-1.0 must be a number >= 0"),
    (lambda: merge.consensus(BASE, MODELS, lam=-1.0), "lam=-1.0 must be a number >= 0"),
])
def test_bad_values_from_python_are_one_line_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
