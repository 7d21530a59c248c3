"""Scoring a model on tasks: exact match by greedy generation, bits per byte by a forward pass.

Every result carries its number of examples and a 95% interval: Wilson's score interval for
an exact-match accuracy, a t-interval over windows for bits per byte.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.evals.base import ANSWER_END, Example, Task
from jmoe.evals.stats import summary
from jmoe.infer.tokenizer import ByteTokenizer, Tokenizer


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """task, metric ("exact_match" accuracy or "bits_per_byte"), value, n (examples or
    windows), ci95 (low, high)."""

    task: str
    metric: str
    value: float
    n: int
    ci95: tuple[float, float]

    def to_dict(self) -> dict:
        return {"task": self.task, "metric": self.metric, "value": self.value, "n": self.n, "ci95": list(self.ci95)}


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """95% t-interval of the mean (`jmoe.evals.stats.summary`; the mean itself twice for a
    single value)."""
    s = summary(values)
    return (s["mean"], s["mean"]) if s["n"] < 2 else (s["ci95"][0], s["ci95"][1])


def exact_match(engine, tokenizer: Tokenizer, task: Task, examples: Sequence[Example]) -> TaskResult:
    """Greedy answers of `engine` (a `jmoe.infer.Engine`) to the examples' prompts, each
    ended by a newline or after one byte more than the longest answer; accuracy."""
    newline = tokenizer.encode(ANSWER_END, add_special_tokens=False)
    stops = list(newline[-1:]) + list(tokenizer.eos_ids)
    prompts = [tokenizer.encode(ex.prompt, add_special_tokens=False) for ex in examples]
    longest = max(len(tokenizer.encode(ex.answer, add_special_tokens=False)) for ex in examples)
    gens, _ = engine.generate(prompts, max_new_tokens=longest + 1, stop_ids=stops)
    correct = sum(tokenizer.decode(g.token_ids).strip() == ex.answer for g, ex in zip(gens, examples))
    return TaskResult(task.name, "exact_match", correct / len(examples), len(examples),
                      wilson_interval(correct, len(examples)))


@functools.lru_cache(maxsize=8)
def _nll_sums(cfg):
    """jit of (params, router state, tokens [B, S + 1]) -> [B] summed next-token NLL (nats),
    compiled once per model config (not once per task)."""
    from jmoe.nn import lm_apply, token_nll

    @jax.jit
    def nll_sums(params, state, tokens):
        logits, _ = lm_apply(params, tokens[:, :-1], cfg, state=state)
        return token_nll(logits, tokens[:, 1:]).sum(-1)

    return nll_sums


def bits_per_byte(cfg, params, state, tokenizer: Tokenizer, task: Task, text: bytes, *, max_windows: int = 64,
                  batch_size: int = 8) -> TaskResult:
    """Negative log2-likelihood per byte of `text`, over up to `max_windows` windows of the
    model's context spread evenly over it (each window's first token is context only)."""
    if isinstance(tokenizer, ByteTokenizer):
        ids = np.frombuffer(text, np.uint8).astype(np.int32)
    else:
        ids = np.asarray(tokenizer.encode(text.decode("utf-8", errors="replace"), add_special_tokens=False), np.int32)
    S = cfg.max_seq_len
    count = (ids.size - 1) // S
    if count < 1:
        raise ValueError(f"task {task.name!r}: its text ({ids.size} tokens) is shorter than one window of {S + 1}")
    starts = np.linspace(0, (count - 1) * S, min(count, max_windows)).astype(np.int64)
    windows = np.stack([ids[s: s + S + 1] for s in starts])

    nll_sums = _nll_sums(cfg)
    nats = []
    for lo in range(0, len(windows), batch_size):
        chunk = windows[lo: lo + batch_size]
        pad = batch_size - len(chunk)
        batch = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
        nats.extend(np.asarray(nll_sums(params, state, jnp.asarray(batch)))[: len(chunk)].tolist())
    if isinstance(tokenizer, ByteTokenizer):
        nbytes = [S] * len(windows)
    else:
        nbytes = [max(1, len(tokenizer.decode(w[1:].tolist()).encode())) for w in windows]
    bpb = [n / math.log(2) / b for n, b in zip(nats, nbytes)]
    return TaskResult(task.name, "bits_per_byte", float(np.mean(bpb)), len(bpb), t_interval(bpb))


def evaluate(model, tasks: Sequence[Task], *, examples: int = 200, max_windows: int = 64, split: str = "test",
             seed: int = 0, batch_size: int = 32, contrast=None) -> list[TaskResult]:
    """Score a `jmoe.infer.Model` (a run or a Hugging Face directory, with its tokenizer) on
    tasks: `examples` examples of each algorithmic task's split, up to `max_windows` windows
    of each text domain's split. contrast: answer with self-contrast decoding
    (`jmoe.infer.contrast.SelfContrast`); bits per byte is the model's own likelihood either way."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError(f"{model.source or 'the model'} has no tokenizer: tasks are text")
    out = []
    for task in tasks:
        if task.kind == "exact_match":
            exs = task.examples(split, examples, seed)
            out.append(exact_match(model.engine(batch_size, contrast), tokenizer, task, exs))
        else:
            out.append(bits_per_byte(model.cfg, model.params, model.state, tokenizer, task, task.text(split),
                                     max_windows=max_windows, batch_size=min(batch_size, 8)))
    return out
