"""What a multi-task merging benchmark of language models needs (FusionBench's protocol on the
evaluation suite, `experiments/merging_benchmark.py`):

  unlabeled_batches    a task's unlabeled inputs as token batches with a mask of the positions
                       whose predictions count (AdaMerging's test-time data)
  entropy_objective    the mean prediction entropy of a jmoe LM on such a batch
  merge_models         a merge method of the table over the fine-tunes of one base
  normalized_scores    each task's merged score over its own fine-tune's (FusionBench's
                       normalised score; for bits per byte, lower is better, own / merged)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.merge.entropy_merging import prediction_entropy
from jmoe.merge.registry import MERGE_METHODS


def unlabeled_batches(task, tokenizer, *, n: int = 64, batch_size: int = 16, seq_len: int = 64,
                      seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(tokens [B, L] int32, mask [B, L] bool)] of the task's train split, without answers:
    for an algorithmic task, its prompts right-padded, masked at the last prompt token (where
    the answer's first token is predicted); for a text domain, windows of its train text, every
    position masked. n examples (windows) in all; L <= seq_len is the same for all the task's
    batches: one past its last masked position."""
    rows, masks = [], []
    if task.kind == "exact_match":
        for ex in task.examples("train", n, seed):
            ids = tokenizer.encode(ex.prompt, add_special_tokens=False)[-seq_len:]
            rows.append(ids + [0] * (seq_len - len(ids)))
            m = np.zeros(seq_len, bool)
            m[len(ids) - 1] = True
            masks.append(m)
    else:
        ids = tokenizer.encode(task.text("train").decode(), add_special_tokens=False)
        starts = np.random.default_rng(seed).integers(0, max(1, len(ids) - seq_len), n)
        for s in starts:
            w = ids[s:s + seq_len]
            rows.append(w + [0] * (seq_len - len(w)))
            masks.append(np.arange(seq_len) < len(w) - 1)
    tokens, mask = np.asarray(rows, np.int32), np.asarray(masks)
    # the columns after the last masked position change no masked prediction (the model is
    # causal): cut them, so that short prompts cost only their own length
    width = int(np.nonzero(mask.any(0))[0].max()) + 1 if mask.any() else 1
    tokens, mask = tokens[:, :width], mask[:, :width]
    return [(tokens[i:i + batch_size], mask[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def entropy_objective(cfg, state: dict | None = None) -> Callable[[Any, tuple], jax.Array]:
    """objective(params, (tokens, mask)) -> the mean entropy of the LM's next-token predictions
    at the masked positions (for `jmoe.merge.adamerging`)."""
    from jmoe.nn import lm_apply

    def objective(params, batch):
        tokens, mask = batch
        logits, _ = lm_apply(params, jnp.asarray(tokens), cfg, state=state)
        return prediction_entropy(logits, jnp.asarray(mask))

    return objective


def merge_models(method: str, base: Any, models: Sequence[Any], **params) -> Any:
    """`jmoe.merge.<method>(base, models, **params)`, or without the base for methods that take
    none (linear, karcher)."""
    spec = MERGE_METHODS.get(method)
    if spec.base:
        return spec(base, list(models), **params)
    return spec(list(models), **params)


def normalized_scores(merged: Mapping[str, float], own: Mapping[str, float], kinds: Mapping[str, str]) -> dict:
    """{task: merged / own} (exact match) or own / merged (bits per byte: lower is better)."""
    out = {}
    for t, v in merged.items():
        if kinds[t] == "bits_per_byte":
            out[t] = own[t] / v if v > 0 else float("nan")
        else:
            out[t] = v / own[t] if own[t] > 0 else float("nan")
    return out
