"""Mowst decoding (`jmoe.infer.mowst`): the lazy, cached decoder equals the teacher-forced
threshold rule computed by full forwards, token by token, in batches of any size; the
extremes of the threshold are the weak expert alone and the plain engine; skipped tokens are
counted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoEConfig
from jmoe.infer import Engine, SamplingParams
from jmoe.infer.mowst import MowstDecoder
from jmoe.nn import LMConfig, init_lm
from jmoe.nn.mowst import MowstConfig, init_mowst, weak_outputs
from tests.util import jit_lm_apply

MOE = MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=8)
CFG = LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, d_ff=16, max_seq_len=32, moe=MOE)
MCFG = MowstConfig(window=2, embed_dim=8, hidden=16, gate_hidden=8)
PROMPTS = [[3, 5, 7, 9], [1, 2], [11, 12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def model():
    params = init_lm(jax.random.key(0), CFG)
    mowst = init_mowst(jax.random.key(1), CFG.vocab_size, MCFG)
    # a gate that reacts to the dispersion, so that tokens fall on both sides of a threshold
    mowst["gate"]["0"]["w"] = mowst["gate"]["0"]["w"] * 200.0
    return params, mowst


_weak = jax.jit(lambda mowst, x: weak_outputs(mowst, x, MCFG))


def _reference(params, mowst, prompt, steps, threshold):
    """Greedy decoding by full forwards: weak argmax where C >= threshold, the model's elsewhere."""
    seq, weak_used = list(prompt), 0
    for _ in range(steps):
        x = jnp.asarray([seq + [0] * (CFG.max_seq_len - len(seq))], jnp.int32)
        strong = jit_lm_apply(params, x, CFG)[0][0, len(seq) - 1]
        wl, conf = _weak(mowst, x)
        use_weak = float(conf[0, len(seq) - 1]) >= threshold
        weak_used += use_weak
        seq.append(int(jnp.argmax(wl[0, len(seq) - 1] if use_weak else strong)))
    return seq[len(prompt):], weak_used


def _median_confidence(mowst):
    toks = jnp.asarray([list(range(CFG.vocab_size))])
    return float(jnp.median(weak_outputs(mowst, toks, MCFG)[1]))


@pytest.mark.parametrize("max_pending, batch_size", [(2, 32), (8, 2), (8, 1)])
def test_lazy_decoding_equals_the_threshold_rule(model, max_pending, batch_size):
    params, mowst = model
    threshold = _median_confidence(mowst)
    dec = MowstDecoder(CFG, params, None, mowst, MCFG, threshold, max_pending=max_pending, batch_size=batch_size)
    gens, stats = dec.generate(PROMPTS, max_new_tokens=10)
    weak = 0
    for p, g in zip(PROMPTS, gens):
        want, w = _reference(params, mowst, p, 10, threshold)
        assert list(g.token_ids) == want
        weak += w
    assert stats.weak_tokens == weak and 0 < weak < stats.decode_tokens == 30
    assert stats.strong_calls < stats.decode_tokens  # the model ran less often than once per token
    assert stats.skip_share == pytest.approx(weak / 30)


def test_threshold_extremes_are_the_weak_expert_and_the_plain_engine(model):
    params, mowst = model
    plain, _ = Engine(CFG, params).generate(PROMPTS, max_new_tokens=9)
    strong, s1 = MowstDecoder(CFG, params, None, mowst, MCFG, 1.0).generate(PROMPTS, max_new_tokens=9)
    assert [g.token_ids for g in strong] == [g.token_ids for g in plain] and s1.weak_tokens == 0
    weak, s0 = MowstDecoder(CFG, params, None, mowst, MCFG, 0.0, max_pending=4).generate(PROMPTS, max_new_tokens=9)
    assert s0.weak_tokens == 27 and s0.strong_calls == 2  # only the catch-ups after 4 waiting tokens, batched
    one = MowstDecoder(CFG, params, None, mowst, MCFG, 0.0, max_pending=4, batch_size=1)
    assert one.generate(PROMPTS, max_new_tokens=9)[1].strong_calls == 3 * 2  # one prompt at a time
    for p, g in zip(PROMPTS, weak):
        seq = list(p)
        for _ in range(9):
            x = jnp.asarray([seq + [0] * (CFG.max_seq_len - len(seq))], jnp.int32)
            seq.append(int(jnp.argmax(_weak(mowst, x)[0][0, len(seq) - 1])))
        assert list(g.token_ids) == seq[len(p):]


def test_sampling_is_deterministic_for_a_seed_and_stops(model):
    params, mowst = model
    dec = MowstDecoder(CFG, params, None, mowst, MCFG, _median_confidence(mowst))
    sampling = SamplingParams(temperature=1.0, top_k=10, repetition_penalty=1.2)
    a = dec.generate(PROMPTS, max_new_tokens=8, sampling=sampling, seed=4)[0]
    b = dec.generate(PROMPTS, max_new_tokens=8, sampling=sampling, seed=4)[0]
    c = dec.generate(PROMPTS, max_new_tokens=8, sampling=sampling, seed=5)[0]
    assert [g.token_ids for g in a] == [g.token_ids for g in b] != [g.token_ids for g in c]
    one = MowstDecoder(CFG, params, None, mowst, MCFG, _median_confidence(mowst), batch_size=1)
    assert [g.token_ids for g in one.generate(PROMPTS, max_new_tokens=8, sampling=sampling, seed=4)[0]] == \
        [g.token_ids for g in a]  # a row's tokens do not depend on the others
    first = a[0].token_ids[2]
    stopped = dec.generate(PROMPTS[:1], max_new_tokens=8, sampling=sampling, seed=4, stop_ids=[first])[0][0]
    assert stopped.finish_reason == "stop" and first not in stopped.token_ids


def test_bad_arguments(model):
    params, mowst = model
    with pytest.raises(ValueError, match="threshold"):
        MowstDecoder(CFG, params, None, mowst, MCFG, 1.5)
    with pytest.raises(ValueError, match="max_pending"):
        MowstDecoder(CFG, params, None, mowst, MCFG, 0.5, max_pending=0)
    with pytest.raises(ValueError, match="batch_size"):
        MowstDecoder(CFG, params, None, mowst, MCFG, 0.5, batch_size=0)
    with pytest.raises(ValueError, match="weak/embed has shape"):
        MowstDecoder(CFG, params, None, mowst, MowstConfig(embed_dim=3, window=2, hidden=16, gate_hidden=8))
