"""Offloaded experts: generation equals the all-resident model (greedy tokens, logits) for
several routers, both slow tiers, every online policy and prefetch; the runtime cache counts
the same hits as the simulator on the trace the run recorded; recorded traces equal the
full forward's routing; the predictors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.infer import Engine
from jmoe.infer.cachesim import simulate
from jmoe.infer.forward import extend, prefill
from jmoe.infer.offload import OffloadedEngine, OffloadedLM, SlotCache, cache_size_for_memory, parse_bytes
from jmoe.infer.predict import (LearnedPredictor, gate_accuracy, gate_prefetch, learned_prefetch, topk_recall,
                                trace_gate_accuracy)
from jmoe.infer.trace import RoutingTrace, recorder_for
from jmoe.layer import ffn_routing
from jmoe.nn import lm_apply
from tests.infer.test_engine import _model

PROMPTS = [[3, 5, 7, 9, 11, 2, 4], [1, 2], [40, 41, 42, 43, 44, 45, 46, 47, 1, 2, 3, 4, 5]]


def _greedy(engine, prompts=PROMPTS, n=6, recorder=None):
    gens, _ = engine.generate(prompts, max_new_tokens=n, recorder=recorder)
    return [g.token_ids for g in gens]


@pytest.mark.parametrize("name,policy,prefetch,tier", [
    ("topk", "lru", "gate", "host"),
    ("sigmoid_bias", "arc", "gate", "disk"),     # MLA, aux-loss-free bias, group-limited routing
    ("moepp", "none", "none", "host"),          # FLOP-free experts, gating residual; load on demand
    ("grouped_softmax", "score", "gate", "host"),  # gated shared expert
])
def test_offloaded_generation_equals_resident(name, policy, prefetch, tier, tmp_path):
    cfg, params, state = _model(name)
    ref = _greedy(Engine(cfg, params, state))
    k = cfg.moe_for(1).top_k
    # k slots: a batch of 3 prompts needs more experts per step than fit, so steps run in groups
    eng = OffloadedEngine(cfg, params, state, cache_size=k, policy=policy, prefetch=prefetch, tier=tier,
                          path=tmp_path / "experts.safetensors" if tier == "disk" else None)
    assert _greedy(eng) == ref
    s = eng.offload_stats
    assert s.requests > 0 and s.bytes_loaded > 0
    assert (s.hits == 0) == (policy == "none")
    assert eng.lm.resident_bytes < sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def test_offloaded_logits_equal_the_cached_forward():
    cfg, params, state = _model("topk")
    tokens = jnp.asarray([[3, 5, 7, 9, 11, 2], [1, 2, 0, 0, 0, 0]], jnp.int32)
    lengths = jnp.asarray([6, 2], jnp.int32)
    ref, cache = prefill(params, state, tokens, lengths, cfg, 16)
    lm = OffloadedLM(cfg, params, state, cache_size=2, policy="lru", prefetch="gate")
    got, ocache, _ = lm.prefill(tokens, lengths, 16)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    tok = jnp.argmax(ref, -1)[:, None].astype(jnp.int32)
    for _ in range(3):
        ref, cache = extend(params, state, tok, cache, cfg)
        got, ocache, _ = lm.extend(tok, ocache)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
        tok = jnp.argmax(ref[:, -1], -1)[:, None].astype(jnp.int32)


def test_runtime_cache_counts_what_the_simulator_counts():
    """One token per step (batch 1, a one-token prompt): the runtime cache and the simulator
    replaying the recorded trace make the same hits, with and without the gate prefetch."""
    cfg, params, state = _model("topk")
    for policy in ("lru", "lfu", "score", "arc"):
        for prefetch in ("none", "gate"):
            eng = OffloadedEngine(cfg, params, state, cache_size=3, policy=policy, prefetch=prefetch)
            rec = recorder_for(cfg)
            _greedy(eng, [[7]], n=16, recorder=rec)
            trace = rec.trace()
            sim = simulate(trace, 3, policy, gate_prefetch(trace) if prefetch == "gate" else None)
            s = eng.offload_stats
            assert (s.requests, s.hits) == (int(sim.requests.sum()), int(sim.hits.sum())), (policy, prefetch)
            assert (s.loads, s.prefetch_loads) == (int(sim.loads.sum()), int(sim.prefetch_loads.sum()))


def test_recorded_trace_equals_the_full_forward_routing():
    cfg, params, state = _model("top_p")  # dynamic k: unused slots are -1
    rec = recorder_for(cfg)
    gens, _ = Engine(cfg, params, state).generate(PROMPTS[:2], max_new_tokens=5, recorder=rec)
    trace = rec.trace()
    assert trace.num_tokens == sum(len(g.prompt_ids) + len(g.token_ids) - 1 for g in gens)
    for g in gens:
        seq = list(g.prompt_ids) + list(g.token_ids[:-1])
        _, aux = lm_apply(params, jnp.asarray([seq]), cfg, state=state)
        ref = []
        for i, a in zip(cfg.moe_layers, aux.moe):
            r = ffn_routing(a.routing, cfg.moe_for(i))
            ref.append(np.where(r.mask, r.expert_ids, -1))
        got = trace.expert_ids[trace.seq_ids == g.index]
        np.testing.assert_array_equal(np.sort(got, -1), np.sort(np.stack(ref, 1), -1))
    # the recorded gate guesses are the lookahead-1 cross-layer gate of a teacher-forced run
    seq = list(gens[0].prompt_ids) + list(gens[0].token_ids[:-1])
    one = recorder_for(cfg)
    Engine(cfg, params, state).generate([seq], max_new_tokens=1, recorder=one)
    rec_acc = trace_gate_accuracy(one.trace())
    direct = gate_accuracy(cfg, params, state, np.asarray([seq]), lookaheads=(1,))[1]
    assert rec_acc[0] is None and direct[0] is None
    np.testing.assert_allclose(rec_acc[1:], direct[1:], atol=1e-6)


def test_offloaded_trace_equals_resident_trace():
    cfg, params, state = _model("topk")
    a, b = recorder_for(cfg), recorder_for(cfg)
    _greedy(Engine(cfg, params, state), recorder=a)
    _greedy(OffloadedEngine(cfg, params, state, cache_size=2, prefetch="none"), recorder=b)
    ta, tb = a.trace(), b.trace()
    np.testing.assert_array_equal(ta.expert_ids, tb.expert_ids)
    np.testing.assert_array_equal(ta.gate_ids, tb.gate_ids)
    np.testing.assert_array_equal(ta.seq_ids, tb.seq_ids)


def _chain_trace(N=400, E=8, L=3, seed=0):
    """Layer l+1's experts are a fixed function of layer l's: perfectly predictable."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(E)
    ids = np.zeros((N, L, 2), np.int32)
    ids[:, 0] = np.stack([rng.choice(E, 2, replace=False) for _ in range(N)])
    for l in range(1, L):
        ids[:, l] = perm[ids[:, l - 1]]
    return RoutingTrace(ids, np.full(ids.shape, 0.5, np.float32), E, np.repeat(np.arange(4), N // 4))


def test_learned_predictor_learns_a_deterministic_chain(tmp_path):
    trace = _chain_trace()
    pred = LearnedPredictor.fit(trace, steps=200)
    acc = pred.accuracy(_chain_trace(seed=0))
    assert acc[0] is None and min(acc[1:]) == 1.0
    pred.save(tmp_path / "p.npz")
    again = LearnedPredictor.load(tmp_path / "p.npz")
    assert again.accuracy(trace) == acc
    sim = simulate(trace, 2, "lru", learned_prefetch(pred, trace))
    assert sim.hits[1:].sum() == sim.requests[1:].sum()  # every predicted layer hits
    with pytest.raises(ValueError, match="not a 'jmoe-expert-predictor'"):
        np.savez(tmp_path / "x.npz", a=np.zeros(2))
        LearnedPredictor.load(tmp_path / "x.npz")


def test_topk_recall_and_checks():
    assert topk_recall(np.array([[0, 1]]), np.array([[1, -1]])) == 1.0
    assert np.isnan(topk_recall(np.array([[0, 1]]), np.array([[-1, -1]])))
    cfg, params, state = _model("topk")
    with pytest.raises(ValueError, match="lookahead 2"):
        gate_accuracy(cfg, params, state, np.zeros((1, 4), np.int32), lookaheads=(2,))


def test_bad_arguments():
    cfg, params, state = _model("topk")
    with pytest.raises(ValueError, match="cache_size=1 must be an integer >= top-k"):
        OffloadedLM(cfg, params, state, cache_size=1)
    with pytest.raises(ValueError, match="needs the future"):
        OffloadedLM(cfg, params, state, cache_size=2, policy="belady")
    with pytest.raises(ValueError, match="prefetch 'learned' needs a LearnedPredictor"):
        OffloadedLM(cfg, params, state, cache_size=2, prefetch="learned")
    with pytest.raises(ValueError, match="tier 'disk' needs a path"):
        OffloadedLM(cfg, params, state, cache_size=2, tier="disk")
    with pytest.raises(ValueError, match="at least top-k = 2"):
        cache_size_for_memory(cfg, params, 100)
    assert cache_size_for_memory(cfg, params, 10**9) == 4
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1.5e6") == 1_500_000
    with pytest.raises(ValueError, match="is not a size"):
        parse_bytes("lots")
    c = SlotCache(4, 2)
    with pytest.raises(ValueError, match="exceeds the cache of 2 slots"):
        c.request([0, 1, 2], [1.0, 1.0, 1.0])
