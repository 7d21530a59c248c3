"""Sampling: each stage against a numpy reference and transformers' processors; keys and rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jmoe.infer.sampling import SamplingParams, process_logits, sample

PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, repetition_penalty=1.3),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=0.8, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.5, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=0.8),
    SamplingParams(temperature=2.0, top_k=1),
]


def _id(p: SamplingParams) -> str:
    default = SamplingParams()
    return ",".join(f"{k}={v}" for k, v in p.to_dict().items() if getattr(default, k) != v) or "greedy"


_sample = jax.jit(sample, static_argnames="params")
_process = jax.jit(process_logits, static_argnames="params")


def _inputs(b=4, v=50, seed=0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(b, v)) * 3).astype(np.float32)
    input_ids = rng.integers(0, v, size=(b, 12))
    seen = np.zeros((b, v), bool)
    np.put_along_axis(seen, input_ids, True, axis=1)
    return logits, seen, input_ids


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference(logits, seen, p: SamplingParams):
    """numpy, one token at a time where it helps reading."""
    x = logits.astype(np.float64).copy()
    if p.repetition_penalty != 1.0:
        pen = np.where(x < 0, x * p.repetition_penalty, x / p.repetition_penalty)
        x = np.where(seen, pen, x)
    if p.temperature == 0.0:
        out = np.full_like(x, -np.inf)
        rows = np.arange(len(x))
        out[rows, x.argmax(-1)] = x[rows, x.argmax(-1)]
        return out
    x = x / p.temperature
    if p.top_k:
        kth = np.sort(x, -1)[:, -min(p.top_k, x.shape[-1])][:, None]
        x = np.where(x < kth, -np.inf, x)
    if p.top_p < 1.0:
        for row in x:
            order = np.argsort(row)  # ascending
            cum = np.cumsum(_softmax(row[order]))
            drop = cum <= 1 - p.top_p
            drop[-1] = False
            row[order[drop]] = -np.inf
    if p.min_p > 0.0:
        probs = _softmax(x)
        x = np.where(probs < p.min_p * probs.max(-1, keepdims=True), -np.inf, x)
    return x


def _same(got, want):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("params", PARAMS + [SamplingParams(repetition_penalty=1.5)], ids=_id)
def test_process_logits_matches_numpy_reference(params):
    logits, seen, _ = _inputs()
    _same(_process(jnp.asarray(logits), jnp.asarray(seen), params), reference(logits, seen, params))


@pytest.mark.parametrize("params", PARAMS, ids=_id)
def test_process_logits_matches_transformers(params):
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits, seen, input_ids = _inputs(seed=1)
    stages = []
    if params.repetition_penalty != 1.0:
        stages.append(lp.RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    stages.append(lp.TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        stages.append(lp.TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        stages.append(lp.TopPLogitsWarper(params.top_p))
    if params.min_p > 0.0:
        stages.append(lp.MinPLogitsWarper(params.min_p))
    scores, ids = torch.tensor(logits), torch.tensor(input_ids)
    for stage in stages:
        scores = stage(ids, scores)
    _same(_process(jnp.asarray(logits), jnp.asarray(seen), params), scores.numpy())


def test_greedy_is_argmax_of_penalised_logits():
    logits, seen, _ = _inputs(b=6)
    keys = jax.random.split(jax.random.key(0), 6)
    np.testing.assert_array_equal(_sample(logits, None, keys, SamplingParams()), logits.argmax(-1))
    p = SamplingParams(repetition_penalty=2.0, top_p=0.5, top_k=3)
    want = reference(logits, seen, SamplingParams(repetition_penalty=2.0)).argmax(-1)
    got = _sample(jnp.asarray(logits), jnp.asarray(seen), keys, p)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)
    processed = _process(jnp.asarray(logits), jnp.asarray(seen), p)
    assert (np.isfinite(processed).sum(-1) == 1).all()
    np.testing.assert_array_equal(np.argmax(processed, -1), want)


def test_top_k_one_is_greedy():
    logits, seen, _ = _inputs(b=8)
    keys = jax.random.split(jax.random.key(3), 8)
    got = _sample(jnp.asarray(logits), jnp.asarray(seen), keys, SamplingParams(temperature=1.5, top_k=1, repetition_penalty=1.2))
    want = _sample(jnp.asarray(logits), jnp.asarray(seen), keys, SamplingParams(repetition_penalty=1.2))
    np.testing.assert_array_equal(got, want)


def test_same_keys_same_samples_and_rows_are_independent():
    params = SamplingParams(temperature=1.0, top_p=0.95)
    step = jax.jit(sample, static_argnames="params")
    logits, seen, _ = _inputs(b=16, v=40, seed=2)
    keys = jax.random.split(jax.random.key(7), 16)
    a = step(jnp.asarray(logits), jnp.asarray(seen), keys, params=params)
    np.testing.assert_array_equal(a, step(jnp.asarray(logits), jnp.asarray(seen), keys, params=params))
    other, other_seen, _ = _inputs(b=16, v=40, seed=9)
    other[5], other_seen[5] = logits[5], seen[5]
    other_keys = jax.random.split(jax.random.key(8), 16).at[5].set(keys[5])
    b = step(jnp.asarray(other), jnp.asarray(other_seen), other_keys, params=params)
    assert int(b[5]) == int(a[5])
    assert (np.asarray(a) != np.asarray(b)).any()
    # different keys give different draws somewhere
    c = step(jnp.asarray(logits), jnp.asarray(seen), jax.random.split(jax.random.key(11), 16), params=params)
    assert (np.asarray(a) != np.asarray(c)).any()


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.9, top_p=0.8, repetition_penalty=1.5), SamplingParams(temperature=1.2, top_k=5, min_p=0.1)],
    ids=_id,
)
def test_sample_frequencies_follow_processed_distribution(params):
    n, v = 20_000, 8
    row = np.array([2.0, 1.5, 1.0, 0.7, 0.2, -0.3, -1.0, -2.0], np.float32)
    seen_row = np.array([True, False, False, True, False, False, False, False])
    logits = jnp.broadcast_to(jnp.asarray(row), (n, v))
    seen = jnp.broadcast_to(jnp.asarray(seen_row), (n, v))
    keys = jax.random.split(jax.random.key(5), n)
    ids = np.asarray(_sample(logits, seen, keys, params))
    counts = np.bincount(ids, minlength=v)
    probs = _softmax(reference(row[None], seen_row[None], params))[0]
    assert counts[probs == 0].sum() == 0
    live = probs > 0
    assert live.sum() >= 2
    chi2 = (((counts[live] - n * probs[live]) ** 2) / (n * probs[live])).sum()
    assert stats.chi2.sf(chi2, live.sum() - 1) > 1e-4, (counts, n * probs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), r"SamplingParams.temperature=-0.1 must be"),
        (dict(temperature=float("nan")), r"SamplingParams.temperature=nan must be a finite number"),
        (dict(top_k=-1), r"SamplingParams.top_k=-1 must be"),
        (dict(top_k=2.5), r"SamplingParams.top_k=2.5 must be an integer"),
        (dict(top_p=0.0), r"SamplingParams.top_p=0.0 must be a number > 0.0 and <= 1.0"),
        (dict(top_p=1.5), r"SamplingParams.top_p=1.5 must be"),
        (dict(min_p=1.0), r"SamplingParams.min_p=1.0 must be a number >= 0.0 and < 1.0"),
        (dict(repetition_penalty=0.0), r"SamplingParams.repetition_penalty=0.0 must be a number > 0.0"),
    ],
)
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_params_are_hashable_static_arguments():
    assert hash(SamplingParams(temperature=1)) == hash(SamplingParams(temperature=1.0))
    assert {SamplingParams(), SamplingParams(top_k=0)} == {SamplingParams()}
    with pytest.raises(Exception):
        SamplingParams().top_k = 3


def test_bad_inputs_are_named():
    logits, seen, _ = _inputs(b=2, v=5)
    keys = jax.random.split(jax.random.key(0), 2)
    p = SamplingParams(temperature=1.0)
    with pytest.raises(ValueError, match=r"logits must be \[B, V\]"):
        sample(jnp.asarray(logits[0]), None, keys, p)
    with pytest.raises(ValueError, match="seen must have the shape of logits"):
        sample(jnp.asarray(logits), jnp.asarray(seen[:, :3]), keys, p)
    with pytest.raises(ValueError, match="seen must be a bool mask"):
        process_logits(jnp.asarray(logits), jnp.asarray(seen, jnp.int32), p)
    with pytest.raises(ValueError, match="keys must hold one key per row"):
        sample(jnp.asarray(logits), None, keys[:1], p)
    with pytest.raises(ValueError, match="params must be a SamplingParams"):
        sample(jnp.asarray(logits), None, keys, {"temperature": 1.0})
