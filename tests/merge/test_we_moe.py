"""WEMoE: the upscaled model starts as task arithmetic, its FFNs hold the fine-tunes' task
vectors, training its routers lowers the prediction entropy and changes nothing else, it
decodes with a KV cache as its full forward, and bad input is refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig, merge
from jmoe.merge.bench import entropy_objective
from jmoe.nn import LMConfig, init_lm
from tests.infer.test_engine import assert_cached_decode_is_the_full_forward
from tests.util import jit_lm_apply, tree_allclose

CFG = LMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=32)
TOKENS = jax.random.randint(jax.random.key(9), (4, 10), 1, 32)
MASK = np.ones((4, 10), bool)


def _zoo(cfg=CFG, n=3):
    base = init_lm(jax.random.key(0), cfg)
    fts = []
    for i in range(n):
        leaves, tree = jax.tree.flatten(base)
        keys = jax.random.split(jax.random.key(100 + i), len(leaves))
        fts.append(jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]))
    return base, fts


def _batches(n=3):
    return [[(np.asarray(TOKENS[2 * (j % 2):2 * (j % 2) + 2]), MASK[:2]) for j in range(2)] for _ in range(n)]


def test_starts_as_task_arithmetic_with_the_task_vectors_as_experts():
    base, fts = _zoo()
    cfg, params = merge.wemoe(CFG, base, fts, _batches(), router_hidden_layers=0, steps=0)
    assert cfg.adapter.kind == "wemoe" and cfg.adapter.num_experts == 3 and not cfg.adapter.options.batch_reduce
    tv = params["adapters"]["1"]["ffn"]["up"]
    np.testing.assert_allclose(tv[2], fts[2]["layers"]["1"]["ffn"]["w_up"] - base["layers"]["1"]["ffn"]["w_up"],
                               rtol=1e-6, atol=1e-7)
    ta = merge.task_arithmetic(base, fts, lam=0.3)
    tree_allclose(params["layers"]["0"]["attn"], ta["layers"]["0"]["attn"], rtol=0, atol=0)
    tree_allclose(params["layers"]["0"]["ffn"], base["layers"]["0"]["ffn"], rtol=0, atol=0)
    got, _ = jit_lm_apply(params, TOKENS, cfg)
    want, _ = jit_lm_apply(ta, TOKENS, CFG)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_batch_reduce_merges_the_ffn_once_with_the_mean_router_output():
    from jmoe.adapters import AdapterConfig
    from jmoe.adapters.wemoe import WEMOE, router_weights
    from jmoe.experts import init_ffn

    cfg = AdapterConfig(kind="wemoe", num_experts=3, options=dict(router_hidden_layers=1, batch_reduce=True))
    shapes = {"gate": (8, 12), "up": (8, 12), "down": (12, 8)}
    params = WEMOE.init(jax.random.key(0), shapes, cfg, "float32")
    params = jax.tree.map(lambda l: l + 0.3 * jax.random.normal(jax.random.key(l.size), l.shape), params)
    base = init_ffn(jax.random.key(1), 8, 12, "swiglu")
    x = jax.random.normal(jax.random.key(2), (5, 8))
    r = jnp.mean(router_weights(params["router"], x), 0)
    w = {k: base[f"w_{k}"] + jnp.einsum("e,eio->io", r, params[k]) for k in shapes}
    want = (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
    np.testing.assert_allclose(WEMOE.apply(base, params, x, "swiglu", cfg)[0], want, rtol=2e-5, atol=2e-5)


def test_router_training_lowers_entropy_and_changes_only_the_routers():
    base, fts = _zoo()
    losses = []
    cfg, trained = merge.wemoe(CFG, base, fts, _batches(), steps=25, lr=1e-2, log=lambda s, l: losses.append(l))
    _, start = merge.wemoe(CFG, base, fts, _batches(), steps=0)
    assert len(losses) == 25 and losses[-1] < losses[0] - 1e-3
    obj = entropy_objective(cfg)
    assert float(obj(trained, (TOKENS, MASK))) < float(obj(start, (TOKENS, MASK)))
    routers = lambda p: {n: a["ffn"]["router"] for n, a in p["adapters"].items()}
    rest = lambda p: {**p, "adapters": {n: {**a, "ffn": {k: v for k, v in a["ffn"].items() if k != "router"}}
                                        for n, a in p["adapters"].items()}}
    tree_allclose(rest(trained), rest(start), rtol=0, atol=0)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), routers(trained), routers(start))
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_decodes_with_a_kv_cache_as_its_full_forward_and_keeps_moe_layers_merged():
    moe_cfg = CFG.replace(n_layers=3, moe=MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8), dense_layers=(0, 2))
    base, fts = _zoo(moe_cfg)
    cfg, params = merge.wemoe(moe_cfg, base, fts, _batches(), router_hidden_layers=1, steps=0)
    for n, a in params["adapters"].items():  # routers whose weights vary from token to token
        a["ffn"]["router"]["w"] = jax.random.normal(jax.random.key(int(n)), a["ffn"]["router"]["w"].shape)
    assert set(params["adapters"]) == {"0", "2"} and cfg.adapter.layers == (0, 2)
    tree_allclose(params["layers"]["1"]["moe"], merge.task_arithmetic(base, fts, lam=0.3)["layers"]["1"]["moe"],
                  rtol=0, atol=0)
    assert_cached_decode_is_the_full_forward(cfg, params, [[3, 5, 7, 9], [1, 2]], 4)


def test_bad_input_is_refused_by_name():
    base, fts = _zoo()
    with pytest.raises(merge.MergeError, match="batches"):
        merge.wemoe(CFG, base, fts, _batches(2))
    with pytest.raises(merge.MergeError, match="router_hidden_layers"):
        merge.wemoe(CFG, base, fts, _batches(), router_hidden_layers=3)
    bad = jax.tree.map(lambda x: x, fts[1])
    bad["layers"]["1"]["ffn"]["w_up"] = jnp.zeros((16, 8))
    with pytest.raises(merge.MergeError, match=r"models\[1\].*w_up"):
        merge.wemoe(CFG, base, [fts[0], bad], _batches(2))
    with pytest.raises(merge.MergeError, match=r"base\['layers'\]\['0'\]\['ffn'\]\['w_down'\] has shape \(24, 16\), cfg says"):
        merge.wemoe(CFG.replace(d_ff=32), base, fts, _batches())
    with pytest.raises(merge.MergeError, match=r"batches\[0\]\[1\] must be a \(tokens \[B, S\], mask \[B, S\]\) pair"):
        merge.wemoe(CFG, base, fts, [[b[0], TOKENS] for b in _batches()])
    with pytest.raises(merge.MergeError, match=r"batches\[2\]\[0\]: token ids must be in \[0, 32\)"):
        merge.wemoe(CFG, base, fts, _batches(2) + [[(np.asarray(TOKENS) + 32, MASK)]])
    with pytest.raises(merge.MergeError, match="steps=2.0 must be an integer"):
        merge.wemoe(CFG, base, fts, _batches(), steps=2.0)
    all_moe = CFG.replace(moe=MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8))
    b2, f2 = _zoo(all_moe, 2)
    with pytest.raises(merge.MergeError, match="has none"):
        merge.wemoe(all_moe, b2, f2, _batches(2))
