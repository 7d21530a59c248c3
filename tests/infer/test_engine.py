"""KV-cached generation of jmoe models: every cached step's logits equal the full forward's,
for every token-choice router, GQA and MLA, batched prompts of different lengths; the
engine's stop ids, context limit, truncation, determinism and batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig
from jmoe.infer import Engine, SamplingParams, extend, init_cache, prefill, values_per_token
from jmoe.nn import LMConfig, init_lm, init_lm_state
from jmoe.nn.attention import AttentionConfig
from tests.util import jit_lm_apply

D = 16
MOE = MoEConfig(num_experts=4, top_k=2, d_model=D, d_ff=8, dispatch_options=dict(block_size=8))
BASE = LMConfig(vocab_size=48, d_model=D, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=16, max_seq_len=40, moe=MOE,
                dense_layers=(0,))
MLA = AttentionConfig(kind="mla", q_lora_rank=8, kv_lora_rank=6, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6,
                      rope_interleave=True)
MODELS = {
    "topk": BASE,
    "sigmoid_bias": BASE.replace(moe=MOE.replace(router="sigmoid_bias", router_options=dict(expert_groups=2, topk_groups=1)),
                                 attention=MLA, n_kv_heads=None),
    "grouped_softmax": BASE.replace(moe=MOE.replace(router="grouped_softmax", num_shared_experts=1, shared_gate=True)),
    "top_p": BASE.replace(moe=MOE.replace(router="top_p", top_k=3), attention=AttentionConfig(qk_norm="head", qkv_bias=True)),
    "null_experts": BASE.replace(moe=MOE.replace(router="null_experts", router_options=dict(num_null_experts=2))),
    "moepp": BASE.replace(moe=MOE.replace(router="moepp", router_options=dict(
        num_zero_experts=1, num_copy_experts=1, num_constant_experts=1, gating_residual=True))),
    "recurrent": BASE.replace(moe=MOE.replace(router="recurrent", router_options=dict(recurrent_dim=8))),
    "capacity_trained": BASE.replace(moe=MOE.replace(dispatch="capacity", router_options=dict(renormalize=True))),
    "attention_experts": BASE.replace(attention=AttentionConfig(experts=3, qk_norm="head")),
    "attention_experts_shared_kv": BASE.replace(attention=AttentionConfig(experts=3, shared_kv=True, qkv_bias=True)),
}
PROMPTS = [[3, 5, 7, 9, 11, 2, 4], [1, 2], [40, 41, 42, 43, 44, 45, 46, 47, 1, 2, 3, 4, 5]]

_prefill = jax.jit(prefill, static_argnums=(4, 5))
_extend = jax.jit(extend, static_argnums=(4,))


def _model(name, seed=0):
    cfg = MODELS[name]
    params = init_lm(jax.random.key(seed), cfg)
    state = init_lm_state(cfg)
    for layer, s in state.items():  # a trained-looking selection bias
        if "bias" in s:
            state[layer] = {**s, "bias": 0.3 * jax.random.normal(jax.random.key(int(layer)), s["bias"].shape)}
    return cfg, params, state


def cached_greedy(cfg, params, state, prompts, steps, max_len=32):
    """Greedy tokens and the logits of every cached step: [B, steps + 1, V]."""
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens = np.zeros((B, P), np.int32)
    for r, p in enumerate(prompts):
        tokens[r, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    logits, cache = _prefill(params, state, jnp.asarray(tokens), lengths, cfg, max_len)
    all_logits, toks = [logits], [jnp.argmax(logits, -1)]
    for _ in range(steps):
        logits, cache = _extend(params, state, toks[-1][:, None].astype(jnp.int32), cache, cfg)
        all_logits.append(logits[:, 0])
        toks.append(jnp.argmax(logits[:, 0], -1))
    return np.stack([np.asarray(t) for t in toks], 1), np.stack([np.asarray(l) for l in all_logits], 1)


def assert_cached_decode_is_the_full_forward(cfg, params, prompts, steps, state=None, tol=2e-4):
    """Greedy cached decoding of `prompts` gives, at every step, the full forward's logits over
    each row's prompt and generated tokens (right-padded; causal, so padding changes nothing
    before it)."""
    from tests.util import jit_lm_apply

    toks, logits = cached_greedy(cfg, params, state or {}, prompts, steps)
    seqs = [p + list(toks[r, :steps]) for r, p in enumerate(prompts)]
    width = max(len(s) for s in seqs)
    full, _ = jit_lm_apply(params, jnp.asarray([s + [0] * (width - len(s)) for s in seqs], jnp.int32), cfg)
    for r, p in enumerate(prompts):
        np.testing.assert_allclose(logits[r], np.asarray(full[r, len(p) - 1: len(p) + steps]), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_logits_equal_the_full_forward(name):
    cfg, params, state = _model(name)
    steps = 6
    toks, logits = cached_greedy(cfg, params, state, PROMPTS, steps)
    # the reference: one full forward over each row's prompt and generated tokens (right-padded;
    # causal, so the padding changes nothing before it). Inference never drops tokens, so a
    # model trained with capacity buffers is compared with its dropless forward.
    ref_cfg = cfg.replace(moe=cfg.moe.replace(dispatch="dropless")) if cfg.moe.dispatch == "capacity" else cfg
    seqs = [p + list(toks[r, :steps]) for r, p in enumerate(PROMPTS)]
    width = max(map(len, seqs))
    full, _ = jit_lm_apply(
        params, jnp.asarray([s + [0] * (width - len(s)) for s in seqs], jnp.int32), ref_cfg, state=state)
    for r, p in enumerate(PROMPTS):
        want = np.asarray(full[r, len(p) - 1: len(p) + steps])
        np.testing.assert_allclose(logits[r], want, rtol=2e-4, atol=2e-4, err_msg=f"{name}, prompt {r}")


@pytest.mark.parametrize("name", ["topk", "sigmoid_bias", "moepp"])
def test_one_row_decodes_through_the_gather_dispatch(name):
    cfg, params, state = _model(name)
    from jmoe.infer.forward import serving_moe

    assert serving_moe(cfg.moe, 1).dispatch == "gather" and serving_moe(cfg.moe, 3 * 7).dispatch == "dropless"
    prompt = PROMPTS[0]
    toks, logits = cached_greedy(cfg, params, state, [prompt], 5)
    full, _ = jit_lm_apply(params, jnp.asarray([prompt + list(toks[0, :5])], jnp.int32), cfg, state=state)
    np.testing.assert_allclose(logits[0], np.asarray(full[0, len(prompt) - 1:]), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", ["sigmoid_bias", "top_p", "moepp"])
def test_split_expert_layout_equals_the_full_forward(name):
    from jmoe.experts import ExpertList
    from jmoe.infer.forward import serving_params

    cfg, params, state = _model(name)
    split = serving_params(params, cfg, "split")
    assert all(isinstance(split["layers"][str(i)]["moe"]["experts"], ExpertList) for i in cfg.moe_layers)
    toks, logits = cached_greedy(cfg, split, state, PROMPTS, 4)
    seqs = [p + list(toks[r, :4]) for r, p in enumerate(PROMPTS)]
    width = max(map(len, seqs))
    full, _ = jit_lm_apply(params, jnp.asarray([s + [0] * (width - len(s)) for s in seqs], jnp.int32), cfg, state=state)
    for r, p in enumerate(PROMPTS):
        np.testing.assert_allclose(logits[r], np.asarray(full[r, len(p) - 1: len(p) + 4]), rtol=2e-4, atol=2e-4)
    restacked = serving_params(split, cfg, "stacked")["layers"][str(cfg.moe_layers[0])]["moe"]["experts"]
    np.testing.assert_array_equal(restacked["w_up"], params["layers"][str(cfg.moe_layers[0])]["moe"]["experts"]["w_up"])
    with pytest.raises(ValueError, match="expert_layout='rows' is unknown"):
        Engine(cfg, params, state, expert_layout="rows")


def test_mla_caches_only_the_latent_and_rope_key():
    cfg = MODELS["sigmoid_bias"]
    assert values_per_token(cfg) == 6 + 4
    cache = init_cache(cfg, batch=3, max_len=32)
    assert cache.nbytes == cfg.n_layers * 3 * 32 * (6 + 4) * 4
    assert set(cache.layers[0]) == {"latent", "k_rope"}
    gqa = init_cache(BASE, batch=3, max_len=32)
    assert gqa.nbytes == BASE.n_layers * 3 * 32 * 2 * 2 * 4 * 4  # k and v, 2 kv heads of width 4


def test_attention_experts_cache_their_own_or_shared_keys_and_values():
    own, shared = MODELS["attention_experts"], MODELS["attention_experts_shared_kv"]
    assert values_per_token(own) == 2 * 3 * 2 * 4  # k and v of 3 experts, 2 kv heads of width 4
    assert values_per_token(shared) == values_per_token(BASE) == 2 * 2 * 4
    assert init_cache(own, batch=2, max_len=8).layers[0]["k"].shape == (2, 8, 6, 4)
    assert init_cache(shared, batch=2, max_len=8).nbytes == init_cache(BASE, batch=2, max_len=8).nbytes


def test_expert_choice_is_refused():
    cfg = BASE.replace(moe=MOE.replace(router="expert_choice", allow_noncausal=True))
    with pytest.raises(ValueError, match="expert_choice.*one token at a time"):
        Engine(cfg, init_lm(jax.random.key(0), cfg))


@pytest.fixture(scope="module")
def engine():
    cfg, params, state = _model("sigmoid_bias")
    return Engine(cfg, params, state, batch_size=4)


def test_engine_greedy_equals_the_cached_loop(engine):
    gens, stats = engine.generate(PROMPTS, max_new_tokens=7)
    toks, _ = cached_greedy(engine.cfg, engine.params, engine.state, PROMPTS, 6)
    for r, g in enumerate(gens):
        assert g.index == r and g.prompt_ids == tuple(PROMPTS[r]) and g.finish_reason == "length"
        assert list(g.token_ids) == list(toks[r])
    assert stats.prompt_tokens == sum(map(len, PROMPTS)) and stats.decode_tokens == 3 * 6
    assert stats.prefill_tokens_per_s > 0 and stats.decode_tokens_per_s > 0
    # the same bucket (4 rows, prompts up to 16, cache of 32) is served by the same compiled steps
    compiled = len(engine._compiled)
    again, stats = engine.generate([[1] * 12, [4], [5, 6]], max_new_tokens=7)
    assert len(engine._compiled) == compiled and stats.compile_s == 0.0


def test_stop_ids_and_streaming(engine):
    full, _ = engine.generate(PROMPTS, max_new_tokens=7)
    stop = full[0].token_ids[3]
    streamed = []
    gens, _ = engine.generate(PROMPTS, max_new_tokens=7, stop_ids=[stop], on_token=lambda i, t: streamed.append((i, t)))
    first = list(full[0].token_ids).index(stop)
    assert gens[0].token_ids == full[0].token_ids[:first] and gens[0].finish_reason == "stop"
    for g in gens:
        assert [t for i, t in streamed if i == g.index] == list(g.token_ids)
        assert stop not in g.token_ids


def test_sampling_is_deterministic_and_independent_of_the_batch(engine):
    s = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    a, _ = engine.generate(PROMPTS, max_new_tokens=8, sampling=s, seed=3)
    b, _ = engine.generate(PROMPTS, max_new_tokens=8, sampling=s, seed=3)
    c, _ = Engine(engine.cfg, engine.params, engine.state, batch_size=1).generate(PROMPTS, max_new_tokens=8, sampling=s, seed=3)
    d, _ = engine.generate(PROMPTS, max_new_tokens=8, sampling=s, seed=4)
    assert [g.token_ids for g in a] == [g.token_ids for g in b] == [g.token_ids for g in c]
    assert [g.token_ids for g in a] != [g.token_ids for g in d]


def test_context_limit_and_truncation(engine):
    C = engine.context  # 40
    gens, _ = engine.generate([list(range(1, 31))], max_new_tokens=20)
    assert len(gens[0].token_ids) == C - 30 and gens[0].finish_reason == "context"
    with pytest.raises(ValueError, match="prompt 1 has 40 tokens.*context of 40"):
        engine.generate([[1, 2], [5] * 40], max_new_tokens=4)
    gens, _ = engine.generate([[1, 2], [5] * 39 + [6]], max_new_tokens=4, truncate=True)
    assert gens[1].prompt_ids == tuple([5] * 35 + [6]) and len(gens[1].token_ids) == 4
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="token id 99 outside the vocabulary of 48"):
        engine.generate([[1, 99]], max_new_tokens=4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[[1.7, 2.2]]), "prompt 0 must be a flat list of integer token ids, got dtype float"),
    (dict(prompts=[1, 2, 3]), "got a list of ids: wrap one prompt as \\[ids\\]"),
    (dict(prompts=["abc"]), "prompt 0 is text"),
    (dict(prompts=[[[1, 2]]]), "prompt 0 must be a flat list .* got shape \\(1, 2\\)"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5 must be an integer >= 1"),
    (dict(max_new_tokens="3"), "max_new_tokens='3' must be an integer >= 1"),
    (dict(stop_ids=5), "stop_ids must be a list of token ids, got int"),
    (dict(stop_ids=["eos"]), "stop_ids holds 'eos', not a token id"),
    (dict(seed=1.5), "seed=1.5 must be an integer"),
])
def test_generate_arguments_are_checked_before_any_work(engine, kwargs, message):
    args = {"prompts": [[1, 2]], "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        engine.generate(args.pop("prompts"), **args)
