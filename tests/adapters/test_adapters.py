"""Adapters equal their naive definitions, forward and gradient; fresh adapters leave the
model unchanged; bad configurations are refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.adapters import AdapterConfig, init_adapters, merge_lora
from jmoe.adapters.dynmole import dynamic_mask, tsallis_entropy
from jmoe.adapters.mixlora import route
from jmoe.experts import init_ffn
from jmoe.nn.transformer import LMConfig, init_lm, init_lm_state, lm_apply, update_lm_state
from jmoe.registry import ADAPTERS
from jmoe import MoEConfig
from tests.util import jit_lm_apply, tree_allclose

D, F, T = 8, 12, 6
SILU = jax.nn.silu


def _cfg(kind, **kw):
    base = dict(kind=kind, rank=4, num_experts=4, top_k=2, alpha=6.0)
    return AdapterConfig(**{**base, **kw})


def _params(kind, cfg, seed=0):
    """Adapter params with nonzero B (a trained adapter), and the frozen FFN."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    shapes = {"gate": (D, F), "up": (D, F), "down": (F, D)}
    shapes = {t: shapes[t] for t in cfg.ffn_targets}
    params = ADAPTERS.get(kind).init(k1, shapes, cfg, "float32")
    leaves, tree = jax.tree.flatten(params)
    noisy = [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, jax.random.split(k2, len(leaves)))]
    return jax.tree.unflatten(tree, noisy), init_ffn(k3, D, F, "swiglu")


def _naive_ffn(base, x, project):
    g = project("gate", x, base["w_gate"])
    u = project("up", x, base["w_up"])
    return project("down", SILU(g) * u, base["w_down"])


def naive(kind, cfg, params, base, x, state=None):
    """The adapted FFN token by token (vmapped), straight from each method's definition."""
    s = cfg.scaling

    def token(xt):
        if kind == "lora":
            proj = lambda n, v, w: v @ (w + s * params[n]["A"] @ params[n]["B"]) if n in params else v @ w
            return _naive_ffn(base, xt, proj)
        elif kind == "mixlora":
            logits = xt @ params["router"]["w"]
            p = jax.nn.softmax(logits)
            top = jnp.argsort(-p, stable=True)[: cfg.top_k]
            w = p[top] / jnp.sum(p[top])
            out = 0.0
            for j in range(cfg.top_k):
                e, we = top[j], w[j]
                proj = lambda n, v, W, e=e: v @ (W + s * params[n]["A"][e] @ params[n]["B"][e]) if n in params else v @ W
                out = out + we * _naive_ffn(base, xt, proj)
            return out
        elif kind == "smora":
            def proj(n, v, W):
                if n not in params:
                    return v @ W
                p = params[n]
                bias = 0.0 if state is None else state[n]["bias"]
                sc = jax.nn.sigmoid(v @ p["router"]) + bias
                top = jnp.argsort(-sc, stable=True)[: cfg.top_k]
                g = sc[top] / jnp.sum(sc[top]) * cfg.top_k
                delta = sum(g[j] * (v @ p["A"][:, top[j]]) * p["B"][top[j]] for j in range(cfg.top_k))
                return v @ W + cfg.lora_alpha / cfg.top_k * delta
            return _naive_ffn(base, xt, proj)
        elif kind == "dynmole":
            def proj(n, v, W):
                if n not in params:
                    return v @ W
                p = params[n]
                probs = jax.nn.softmax(v @ p["router"])
                order = jnp.argsort(-probs, stable=True)
                csum = jnp.cumsum(probs[order])
                keep = jnp.zeros(cfg.num_experts, bool)
                for j in range(cfg.num_experts):
                    keep = keep.at[order[j]].set((csum[j] <= cfg.options.top_p) | (j < cfg.top_k))
                entropy = tsallis_entropy(probs[None], cfg.options.entropy_q)[0]
                keep = keep | (entropy > cfg.options.entropy_threshold)
                delta = sum(jnp.where(keep[e], probs[e], 0.0) * s * (v @ p["A"][e]) @ p["B"][e]
                            for e in range(cfg.num_experts))
                return v @ W + delta
            return _naive_ffn(base, xt, proj)
        elif kind == "wemoe":
            r = params["router"]
            if "weights" in r:
                w = r["weights"]
            elif "w" in r:
                w = xt @ r["w"] + r["b"]
            else:
                w = jnp.maximum(xt @ r["w1"] + r["b1"], 0.0) @ r["w2"] + r["b2"]
            merged = lambda n, W: W + sum(w[e] * params[n][e] for e in range(cfg.num_experts)) if n in params else W
            return _naive_ffn(base, xt, lambda n, v, W: v @ merged(n, W))
        elif kind == "twin":
            r = params["router"]
            p = jax.nn.softmax(jax.nn.leaky_relu(xt @ r["w1"] + r["b1"]) @ r["w2"] + r["b2"])
            merged = lambda n, W: (W + sum(p[e] * params[n]["A"][e] @ params[n]["B"][e] for e in range(cfg.num_experts))
                                   if n in params else W)
            return _naive_ffn(base, xt, lambda n, v, W: v @ merged(n, W))

    return jax.vmap(token)(x)


CASES = [("lora", {}), ("lora", dict(ffn_targets=("up",))), ("mixlora", {}), ("mixlora", dict(top_k=4)),
         ("mixlora", dict(options=dict(impl="grouped"))),
         ("mixlora", dict(top_k=3, options=dict(impl="chunked", block_size=4))),
         ("mixlora", dict(ffn_targets=("gate", "down"))),
         ("mixlora", dict(ffn_targets=("gate", "down"), options=dict(impl="chunked", block_size=8))),
         ("mixlora", dict(ffn_targets=("up",), options=dict(impl="chunked"))), ("smora", dict(rank=6, top_k=3)),
         ("dynmole", dict(num_experts=3, top_k=1)), ("dynmole", dict(options=dict(entropy_threshold=0.2))),
         ("wemoe", dict(num_experts=3)), ("wemoe", dict(ffn_targets=("up", "down"), options=dict(router_hidden_layers=1))),
         ("wemoe", dict(options=dict(router_hidden_layers=0))), ("twin", {}),
         ("twin", dict(num_experts=2, rank=3, ffn_targets=("gate", "down"), options=dict(router_hidden=1)))]


@pytest.mark.parametrize("kind,kw", CASES)
def test_adapted_ffn_equals_its_definition_forward_and_gradient(kind, kw):
    cfg = _cfg(kind, **kw)
    params, base = _params(kind, cfg)
    x = jax.random.normal(jax.random.key(3), (T, D))
    fast = jax.jit(lambda p, x: ADAPTERS.get(kind).apply(base, p, x, "swiglu", cfg)[0])
    probe = jax.random.normal(jax.random.key(4), (T, D))
    loss_fast = lambda p, x: jnp.sum(fast(p, x) * probe)
    loss_ref = lambda p, x: jnp.sum(naive(kind, cfg, p, base, x) * probe)
    (_, y_fast), g_fast = jax.jit(jax.value_and_grad(lambda p, x: (loss_fast(p, x), fast(p, x)), argnums=(0, 1),
                                                     has_aux=True))(params, x)
    (_, y_ref), g_ref = jax.jit(jax.value_and_grad(lambda p, x: (loss_ref(p, x), naive(kind, cfg, p, base, x)),
                                                   argnums=(0, 1), has_aux=True))(params, x)
    np.testing.assert_allclose(y_fast, y_ref, rtol=2e-5, atol=2e-5)
    tree_allclose(g_fast, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation,targets", [("gelu", ("gate", "up", "down")), ("gelu", ("up",)),
                                                ("swiglu", ("gate",)), ("swiglu", ("down",))])
def test_mixlora_implementations_agree_forward_and_gradient(activation, targets):
    """chunked (narrow rows of every expert's x A) and grouped equal masked, for a plain (gelu,
    which ignores a gate LoRA) and a gated activation, on any subset of the projections."""
    base = init_ffn(jax.random.key(0), D, F, activation)
    x = jax.random.normal(jax.random.key(2), (3 * T, D))
    shapes = {"gate": (D, F), "up": (D, F), "down": (F, D)}
    out = {}
    for impl in ("masked", "chunked", "grouped"):
        cfg = _cfg("mixlora", ffn_targets=targets, options=dict(impl=impl, block_size=8))
        params = ADAPTERS.get("mixlora").init(jax.random.key(1), {t: shapes[t] for t in targets}, cfg, "float32")
        params = jax.tree.map(lambda a: a + 0.1, params)
        loss = lambda p, x, cfg=cfg: jnp.sum(ADAPTERS.get("mixlora").apply(base, p, x, activation, cfg)[0] ** 2)
        out[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    for impl in ("chunked", "grouped"):
        tree_allclose(out[impl], out["masked"], rtol=1e-4, atol=1e-4)


def test_mixlora_with_every_token_on_one_expert_and_empty_experts():
    cfg = _cfg("mixlora", top_k=1)
    params, base = _params("mixlora", cfg)
    params["router"]["w"] = jnp.zeros((D, 4)).at[:, 2].set(50.0)
    x = jnp.abs(jax.random.normal(jax.random.key(5), (T, D)))  # positive: every token prefers expert 2
    y, aux = ADAPTERS.get("mixlora").apply(base, params, x, "swiglu", cfg)
    np.testing.assert_array_equal(aux.counts["router"], [0, 0, T, 0])
    np.testing.assert_allclose(y, naive("mixlora", cfg, params, base, x), rtol=2e-5, atol=2e-5)
    assert float(aux.balance_loss) == pytest.approx(4 * 1.0 * float(jnp.mean(jax.nn.softmax(x @ params["router"]["w"])[:, 2])),
                                                    rel=1e-5)


def test_smora_state_follows_the_counts():
    cfg = _cfg("smora", rank=6, top_k=2)
    params, base = _params("smora", cfg)
    state = ADAPTERS.get("smora").init_state({"gate": (D, F), "up": (D, F), "down": (F, D)}, cfg)
    state["up"]["bias"] = jnp.linspace(-0.3, 0.3, 6)
    x = jax.random.normal(jax.random.key(6), (T, D))
    y, aux = ADAPTERS.get("smora").apply(base, params, x, "swiglu", cfg, state=state)
    np.testing.assert_allclose(y, naive("smora", cfg, params, base, x, state), rtol=2e-5, atol=2e-5)
    assert set(aux.counts) == {"gate", "up", "down"} and float(jnp.sum(aux.counts["up"])) == T * 2
    new = ADAPTERS.get("smora").update_state(state, aux.counts, cfg)
    c = np.asarray(aux.counts["up"])
    step = np.asarray(new["up"]["bias"] - state["up"]["bias"])
    np.testing.assert_allclose(step, 1e-5 * np.sign(c.mean() - c), atol=1e-7)


def test_tsallis_entropy_and_the_hybrid_rule():
    uniform = jnp.full((1, 4), 0.25)
    one_hot = jnp.asarray([[1.0, 0.0, 0.0, 0.0]])
    for q in (1.0, 1.1, 2.0):
        assert float(tsallis_entropy(uniform, q, eps=0.0)[0]) == pytest.approx(1.0, abs=1e-6)
        assert float(tsallis_entropy(one_hot, q, eps=1e-9)[0]) == pytest.approx(0.0, abs=1e-6)
    cfg = _cfg("dynmole", top_k=1, options=dict(top_p=0.5, entropy_threshold=0.9))
    keep, h = dynamic_mask(jnp.asarray([[0.7, 0.2, 0.05, 0.05], [0.26, 0.25, 0.25, 0.24]]), cfg)
    np.testing.assert_array_equal(keep, [[True, False, False, False], [True, True, True, True]])
    assert float(h[1]) > 0.9 > float(h[0])


def test_mixlora_router_renormalises_the_top_k():
    ids, w, p = route({"w": jax.random.normal(jax.random.key(0), (D, 5))}, jax.random.normal(jax.random.key(1), (T, D)), 3)
    np.testing.assert_allclose(jnp.sum(w, -1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(ids, jnp.argsort(-p, axis=-1, stable=True)[:, :3])


# ------------------------------------------------------------------------- on a model

DENSE = LMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=32)
MOE = DENSE.replace(moe=MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8), dense_layers=(0,))
TOKENS = jax.random.randint(jax.random.key(9), (2, 7), 0, 32)
apply = jit_lm_apply


@pytest.mark.parametrize("kind,model", [("lora", "dense"), ("mixlora", "dense"), ("dynmole", "dense"), ("smora", "moe"),
                                        ("wemoe", "dense"), ("twin", "dense")])
def test_fresh_adapters_leave_the_model_unchanged(kind, model):
    base_cfg = DENSE if model == "dense" else MOE
    cfg = base_cfg.replace(adapter=_cfg(kind, attn_targets=("wq", "wo"), rank=2, top_k=2, moe_mode="shared"))
    params = init_lm(jax.random.key(0), cfg)
    base = init_lm(jax.random.key(0), base_cfg)
    tree_allclose({k: v for k, v in params.items() if k != "adapters"}, base, rtol=0, atol=0)
    want, _ = apply(base, TOKENS, base_cfg)
    got, aux = apply(params, TOKENS, cfg, state=init_lm_state(cfg))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert set(aux.adapters) == ({"0", "1"} if model == "dense" else {"0"})


def test_lora_merges_into_the_weights_and_moe_experts_take_per_expert_lora():
    cfg = MOE.replace(adapter=_cfg("lora", attn_targets=("wq", "wk", "wv", "wo"), moe_mode="per_expert"))
    params = init_lm(jax.random.key(0), cfg)
    leaves, tree = jax.tree.flatten(params["adapters"])
    params["adapters"] = jax.tree.unflatten(tree, [l + 0.1 * jax.random.normal(jax.random.key(i), l.shape)
                                                   for i, l in enumerate(leaves)])
    assert params["adapters"]["1"]["experts"]["w_up"]["A"].shape == (4, 16, 4)
    adapted, _ = apply(params, TOKENS, cfg)
    merged = merge_lora(params, cfg)
    plain, _ = apply(merged, TOKENS, cfg.replace(adapter=None))
    np.testing.assert_allclose(adapted, plain, rtol=1e-4, atol=1e-4)
    without, _ = apply({k: v for k, v in params.items() if k != "adapters"}, TOKENS, cfg.replace(adapter=None))
    assert float(jnp.max(jnp.abs(adapted - without))) > 1e-3


def test_gradients_reach_only_the_adapters_and_smora_state_updates():
    cfg = DENSE.replace(adapter=_cfg("smora", rank=4, top_k=2))
    params = init_lm(jax.random.key(0), cfg)
    state = init_lm_state(cfg)
    assert set(state) == {"adapter/0", "adapter/1"}

    def loss(adapters):
        logits, aux = lm_apply({**params, "adapters": adapters}, TOKENS, cfg, state=state)
        return jnp.mean(logits**2) + aux.moe_loss, aux

    (_, aux), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params["adapters"])
    assert any(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(g))
    new = update_lm_state(state, aux.counts(cfg), cfg)
    assert not np.array_equal(new["adapter/0"]["up"]["bias"], state["adapter/0"]["up"]["bias"])


@pytest.mark.parametrize("kw,match", [
    (dict(kind="nope"), "AdapterConfig.kind='nope' is unknown"),
    (dict(rank=40), "rank=40 exceeds the width of layer 0's FFN"),
    (dict(layers=(5,)), "layers has layer 5, but the model has 2 layers"),
    (dict(attn_targets=("wqq",)), "attn_targets has 'wqq'"),
    (dict(kind="mixlora", top_k=9), "top_k=9 must be <= num_experts=4"),
    (dict(kind="smora", top_k=5, rank=4), "top_k=5 \\(active ranks\\) must be <= rank=4"),
    (dict(ffn_targets=("mid",)), "ffn_targets has 'mid'"),
    (dict(options=dict(top_p=2.0), kind="dynmole"), "top_p"),
])
def test_bad_adapter_configs_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        DENSE.replace(adapter=AdapterConfig(**{**dict(rank=4, num_experts=4), **kw}))


def test_adapter_config_round_trips_through_dict():
    cfg = DENSE.replace(adapter=_cfg("dynmole", attn_targets=("wv",), layers=(1,), options=dict(top_p=0.5)))
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    assert "adapter" not in DENSE.to_dict()


def test_cached_generation_with_adapters_equals_the_full_forward(kind="mixlora"):
    from tests.infer.test_engine import cached_greedy

    cfg = MOE.replace(adapter=_cfg(kind, attn_targets=("wq", "wv", "wo"), rank=2))
    params = init_lm(jax.random.key(0), cfg)
    leaves, tree = jax.tree.flatten(params["adapters"])
    params["adapters"] = jax.tree.unflatten(tree, [l + 0.2 * jax.random.normal(jax.random.key(i), l.shape)
                                                   for i, l in enumerate(leaves)])
    state = init_lm_state(cfg)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    toks, logits = cached_greedy(cfg, params, state, prompts, 4, max_len=16)
    seqs = [p + list(toks[r, :4]) for r, p in enumerate(prompts)]
    full, _ = apply(params, jnp.asarray([s + [0] * (9 - len(s)) for s in seqs], jnp.int32), cfg, state=state)
    for r, p in enumerate(prompts):
        np.testing.assert_allclose(logits[r], np.asarray(full[r, len(p) - 1: len(p) + 4]), rtol=2e-4, atol=2e-4)


def test_adapter_params_that_are_not_the_configs_are_refused_by_leaf():
    from jmoe.adapters.base import init_lora

    cfg = DENSE.replace(adapter=_cfg("lora", rank=4))
    params = init_lm(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match="cfg has no adapter"):
        init_adapters(jax.random.key(0), DENSE)
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        init_adapters(0, cfg)
    extra = {**params, "adapters": {**params["adapters"], "7": params["adapters"]["0"]}}
    with pytest.raises(ValueError, match=r"params\['adapters'\]\['7'\].* is not an adapter of this model"):
        merge_lora(extra, cfg)
    wider = init_lm(jax.random.key(0), DENSE.replace(adapter=_cfg("lora", rank=8)))
    for call in (lambda: merge_lora(wider, cfg), lambda: lm_apply(wider, TOKENS, cfg)):
        with pytest.raises(ValueError, match=r"params\['adapters'\]\['0'\].* has shape .* \(cfg.adapter rank 4\)"):
            call()
    for rank in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"rank={rank} must be an integer >= 1"):
            init_lora(jax.random.key(0), 8, 8, rank, jnp.float32)
