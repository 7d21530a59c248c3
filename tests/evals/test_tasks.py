"""The evaluation tasks: fixed disjoint splits, correct answers, scores against references."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import evals
from jmoe.evals.base import Example
from jmoe.infer.engine import Generation
from jmoe.infer.tokenizer import ByteTokenizer
from jmoe.nn import init_lm, lm_apply
from jmoe.nn.transformer import LMConfig

ALGORITHMIC = ["addition", "reversal", "sorting", "kv_recall", "brackets"]
TEXT = ["python", "prose", "unicode"]


def test_registry_and_names():
    assert set(ALGORITHMIC + TEXT) <= set(evals.TASKS.names())
    assert [t.name for t in evals.resolve_tasks("addition, prose")] == ["addition", "prose"]
    assert {t.name for t in evals.resolve_tasks("all")} == set(evals.TASKS.names())
    with pytest.raises(ValueError, match="unknown task 'adition'"):
        evals.resolve_tasks("adition")
    with pytest.raises(ValueError, match="no task named"):
        evals.resolve_tasks(" , ")


def _reference_answer(name: str, prompt: str) -> str:
    """Each task's answer computed another way, from its prompt."""
    body = prompt.split(" ", 1)[1].rstrip("=")
    if name == "addition":
        return str(eval(body))  # noqa: S307 - digits and one plus sign
    if name == "reversal":
        return "".join(reversed(body))
    if name == "sorting":
        return " ".join(sorted(body.split(), key=int))
    if name == "kv_recall":
        pairs, query = body.split(" ?")
        return dict(p.split("=") for p in pairs.split())[query]
    if name == "brackets":
        s = body
        while "()" in s or "[]" in s:
            s = s.replace("()", "").replace("[]", "")
        return "yes" if not s else "no"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ALGORITHMIC)
def test_examples_are_right_fixed_and_in_disjoint_splits(name):
    task = evals.TASKS.get(name)
    splits = {s: task.examples(s, 40, seed=0) for s in evals.SPLITS}
    for s, exs in splits.items():
        assert len({e.prompt for e in exs}) == len(exs) == 40
        for e in exs:
            assert evals.split_of(e.prompt) == s
            assert e.answer == _reference_answer(name, e.prompt), e
            assert "\n" not in e.prompt + e.answer and e.line.endswith("\n")
    prompts = [{e.prompt for e in exs} for exs in splits.values()]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    assert task.examples("test", 40, seed=0) == splits["test"]
    assert task.examples("test", 10, seed=0) == splits["test"][:10]  # fewer draws: a prefix
    assert task.examples("test", 40, seed=1) != splits["test"]
    if name == "brackets":
        answers = [e.answer for e in splits["train"]]
        assert 0.25 < answers.count("yes") / len(answers) < 0.75


@pytest.mark.parametrize("name", TEXT)
def test_text_domains_have_every_split(name):
    task = evals.TASKS.get(name)
    sizes = {s: len(task.text(s)) for s in evals.SPLITS}
    assert sizes["train"] > 5 * sizes["test"] > 0 and sizes["val"] > 10_000
    with pytest.raises(ValueError, match="text domain"):
        task.examples("test", 1)
    assert task.training_text(0) == task.text("train")


def test_bad_split_and_kind():
    with pytest.raises(ValueError, match="split 'dev'"):
        evals.TASKS.get("addition").examples("dev", 1)
    with pytest.raises(ValueError, match="algorithmic"):
        evals.TASKS.get("addition").text("test")
    with pytest.raises(ValueError, match="kind 'f1'"):
        evals.Task("x", "f1", "")


def test_wilson_interval():
    lo, hi = evals.wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert evals.wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))


class HalfRightEngine:
    """Answers the even prompts right and the odd ones wrong (a stand-in for a model)."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def generate(self, prompts, *, max_new_tokens, stop_ids):
        self.calls.append((max_new_tokens, tuple(stop_ids)))
        out = []
        for i, p in enumerate(prompts):
            text = self.answers[i] if i % 2 == 0 else "?"
            out.append(Generation(i, tuple(p), tuple(text.encode()), "stop"))
        return out, None


def test_exact_match_scores_the_generated_answers():
    task = evals.TASKS.get("addition")
    exs = task.examples("test", 20)
    engine = HalfRightEngine([e.answer for e in exs])
    r = evals.exact_match(engine, ByteTokenizer(), task, exs)
    assert (r.value, r.n, r.metric) == (0.5, 20, "exact_match")
    assert r.ci95[0] < 0.5 < r.ci95[1]
    longest = max(len(e.answer) for e in exs)
    assert engine.calls == [(longest + 1, (ord("\n"),))]


def test_bits_per_byte_equals_a_direct_forward():
    cfg = LMConfig(vocab_size=256, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=24, moe=None)
    params = init_lm(jax.random.key(0), cfg)
    text = bytes(range(97, 123)) * 20
    task = evals.Task("letters", "bits_per_byte", "", items=lambda: [text.decode()])
    r = evals.bits_per_byte(cfg, params, None, ByteTokenizer(), task, text, max_windows=5, batch_size=2)
    ids = np.frombuffer(text, np.uint8).astype(np.int32)
    starts = np.linspace(0, ((ids.size - 1) // 24 - 1) * 24, 5).astype(int)
    want = []
    for s in starts:
        w = jnp.asarray(ids[s: s + 25])[None]
        logits, _ = lm_apply(params, w[:, :-1], cfg)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), w[:, 1:, None], -1).sum()
        want.append(float(nll) / 24 / math.log(2))
    assert r.n == 5 and r.value == pytest.approx(np.mean(want), rel=1e-5)
    assert r.ci95[0] <= r.value <= r.ci95[1]
    assert 6.0 < r.value < 10.0  # an untrained model is near uniform over 256 bytes (8 bits)
    with pytest.raises(ValueError, match="shorter than one window"):
        evals.bits_per_byte(cfg, params, None, ByteTokenizer(), task, text[:20])


def test_evaluate_a_model_on_both_kinds():
    from jmoe import MoEConfig
    from jmoe.infer.load import Model

    moe = MoEConfig(num_experts=4, top_k=2, d_model=16, d_ff=16)
    cfg = LMConfig(vocab_size=256, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=32, moe=moe)
    model = Model(cfg, init_lm(jax.random.key(0), cfg), {}, ByteTokenizer(), source="tiny")
    results = evals.evaluate(model, evals.resolve_tasks("kv_recall,unicode"), examples=6, max_windows=3, batch_size=4)
    em, bpb = results
    assert (em.task, em.metric, em.n) == ("kv_recall", "exact_match", 6) and 0.0 <= em.value <= 1.0
    assert em.ci95[0] <= em.value <= em.ci95[1]
    assert (bpb.task, bpb.metric, bpb.n) == ("unicode", "bits_per_byte", 3) and bpb.value > 1.0
    assert set(em.to_dict()) == {"task", "metric", "value", "n", "ci95"}
    with pytest.raises(ValueError, match="has no tokenizer"):
        evals.evaluate(Model(cfg, model.params, {}, None, source="x"), evals.resolve_tasks("addition"))
