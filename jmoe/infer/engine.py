"""Batched generation over a KV cache: buckets, compiled steps, stop ids, streaming, speed.

A batch of prompts is right-padded to a bucket of (rows, prompt length, cache length), so
one compiled prefill and one compiled decode step serve every batch of that bucket:
  rows           the next power of two of the batch (extra rows are empty and discarded)
  prompt length  the next power of two, at least 16
  cache length   prompt bucket or the longest prompt plus max_new_tokens, rounded up (to a
                 power of two up to 256, then to a multiple of 256), at most the context.
Sampling runs inside the compiled steps; each row samples with its own key, derived from
the seed and the prompt's index, so a prompt's text does not depend on its batch. The keys
are threefry keys whatever the default PRNG implementation: threefry gives the same bits for
a key whether or not it is drawn in a batch, which "rbg" does not.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.checks import check_int, is_int
from jmoe.infer.cache import KVCache
from jmoe.infer.contrast import SelfContrast
from jmoe.infer.forward import check_servable, extend, prefill, serving_params
from jmoe.infer.sampling import SamplingParams, sample
from jmoe.infer.trace import TraceRecorder
from jmoe.nn.transformer import LMConfig
from jmoe.progress import Progress

MIN_PROMPT_BUCKET = 16
PRNG_IMPL = "threefry2x32"


@dataclasses.dataclass(frozen=True)
class Generation:
    """One prompt's result.

    index: the prompt's position in the input list.
    prompt_ids: the prompt as the model saw it (after truncation).
    token_ids: the generated ids, the stop id that ended it excluded.
    finish_reason: "stop" (a stop id), "length" (max_new_tokens) or "context" (the model's
      context is full).
    """

    index: int
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    finish_reason: str


@dataclasses.dataclass
class GenerationStats:
    """Token counts and seconds of one `generate` call (compilation timed apart)."""

    prompt_tokens: int = 0
    decode_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def length_bucket(n: int) -> int:
    """A power of two up to 256, then a multiple of 256."""
    return _pow2(n) if n <= 256 else -(-n // 256) * 256


def _row_keys(key: jax.Array, indices: np.ndarray) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))


def sample_after_prefill(logits, tokens, lengths, row_keys, *, cfg, sampling):
    """The first new token of each row [B] and, with a repetition penalty, the [B, V] tokens
    seen so far (else None)."""
    B, P = tokens.shape
    seen = None
    if sampling.repetition_penalty != 1.0:
        valid = jnp.arange(P)[None, :] < lengths[:, None]
        seen = jnp.zeros((B, cfg.vocab_size), bool).at[jnp.arange(B)[:, None], jnp.where(valid, tokens, cfg.vocab_size)].set(
            True, mode="drop")
    tok = sample(logits, seen, jax.vmap(lambda k: jax.random.fold_in(k, 0))(row_keys), sampling)
    if seen is not None:
        seen = seen.at[jnp.arange(B), tok].set(True)
    return tok, seen


def sample_after_decode(logits, tok, seen, row_keys, step, *, sampling):
    """The next token of each row from decode logits [B, V] (and the updated seen tokens)."""
    nxt = sample(logits, seen, jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys), sampling)
    if seen is not None:
        seen = seen.at[jnp.arange(tok.shape[0]), nxt].set(True)
    return nxt, seen


def _prefill_step(params, state, tokens, lengths, row_keys, live, *, cfg, max_len, sampling, with_routing=False,
                  contrast=None):
    logits, cache, *routing = prefill(params, state, tokens, lengths, cfg, max_len, with_routing=with_routing)
    if contrast is not None:  # the weak routing's pass, with its own cache
        weak, weak_cache = prefill(params, state, tokens, lengths, contrast.weak_config(cfg), max_len)
        logits, cache = contrast.combine(logits, weak), (cache, weak_cache)
    tok, seen = sample_after_prefill(logits, tokens, lengths, row_keys, cfg=cfg, sampling=sampling)
    return tok, cache, seen, logits, *routing


def _decode_step(params, state, cache, tok, seen, row_keys, step, live, *, cfg, sampling, with_routing=False,
                 contrast=None):
    if contrast is not None:
        cache, weak_cache = cache
    logits, cache, *routing = extend(params, state, tok[:, None], cache, cfg, with_routing=with_routing)
    logits = logits[:, 0]
    if contrast is not None:
        weak, weak_cache = extend(params, state, tok[:, None], weak_cache, contrast.weak_config(cfg))
        logits, cache = contrast.combine(logits, weak[:, 0]), (cache, weak_cache)
    nxt, seen = sample_after_decode(logits, tok, seen, row_keys, step, sampling=sampling)
    return nxt, cache, seen, logits, *routing


def prepare_prompts(prompts: Sequence[Sequence[int]], cfg: LMConfig, max_new_tokens: int, *,
                    truncate: bool = False) -> list[list[int]]:
    """The prompts as token lists, checked against the model (ValueError naming the prompt)
    and, with `truncate`, cut to their last tokens so that max_new_tokens fit in its context."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if is_int(prompts[0]):
        raise ValueError("prompts must be a list of token-id lists, got a list of ids: wrap one prompt as [ids]")
    check_int(max_new_tokens, "max_new_tokens")
    V, C = cfg.vocab_size, cfg.max_seq_len
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)):
            raise ValueError(f"prompt {i} is text ({p[:20]!r}); encode it to token ids first")
        arr = np.asarray(p)
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"prompt {i} must be a flat list of integer token ids, got "
                             + (f"shape {arr.shape}" if arr.ndim != 1 else f"dtype {arr.dtype}"))
        ids = [int(t) for t in arr]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary of {V}")
        if len(ids) >= C:
            if not truncate:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; the model's context of {C} leaves no room to "
                                 "generate (shorten it, or truncate it to its last tokens)")
            ids = ids[-max(1, C - max_new_tokens):]
        out.append(ids)
    return out


def _stop_ids(stop_ids) -> set[int]:
    """The token ids that end a generation, from a list of integers."""
    if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, Iterable):
        raise ValueError(f"stop_ids must be a list of token ids, got {type(stop_ids).__name__}")
    stops = list(stop_ids)
    bad = [s for s in stops if not is_int(s) or s < 0]
    if bad:
        raise ValueError(f"stop_ids holds {bad[0]!r}, not a token id (an integer >= 0)")
    return {int(s) for s in stops}


class Engine:
    """Generation from one model: `Engine(cfg, params, state).generate(prompt_ids, ...)`.

    Holds the compiled prefill and decode steps of every bucket it has served, so later calls
    with the same bucket start at once.

    Args:
      cfg: the model's `LMConfig` (routers that choose tokens per expert are refused).
      params: its parameters (from `init_lm`, a run, or a Hugging Face checkpoint).
      state: its router state (e.g. the aux-loss-free selection bias), if any.
      batch_size: most prompts decoded together (default 32).
      expert_layout: how the engine holds routed experts (`serving_params`): "auto" (split
        into separate arrays on the CPU, stacked elsewhere), "split" or "stacked". Splitting
        copies the expert weights once; `Engine.params` holds the copy.
      contrast: self-contrast decoding (`jmoe.infer.contrast.SelfContrast`): every token also
        runs with a weak routing and the two are contrasted (twice the compute); None decodes
        with the model's routing alone.
    """

    def __init__(self, cfg: LMConfig, params: dict, state: dict | None = None, *, batch_size: int = 32,
                 expert_layout: str = "auto", contrast: SelfContrast | None = None):
        check_servable(cfg)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if contrast is not None:
            if not isinstance(contrast, SelfContrast):
                raise ValueError(f"contrast must be a SelfContrast, got {type(contrast).__name__}")
            contrast.weak_config(cfg)  # a ValueError now for a model it cannot weaken
        params = serving_params(params, cfg, expert_layout)
        self.cfg, self.params, self.state, self.batch_size = cfg, params, state or {}, batch_size
        self.contrast = contrast
        self._compiled: dict = {}

    @property
    def context(self) -> int:
        """Positions the model can attend over (its max_seq_len)."""
        return self.cfg.max_seq_len

    def prepare(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, truncate: bool = False) -> list[list[int]]:
        """`prepare_prompts` for this model."""
        return prepare_prompts(prompts, self.cfg, max_new_tokens, truncate=truncate)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams = SamplingParams(),
        stop_ids: Sequence[int] = (),
        seed: int = 0,
        truncate: bool = False,
        on_token: Callable[[int, int], None] | None = None,
        progress: bool = False,
        recorder: TraceRecorder | None = None,
    ) -> tuple[list[Generation], GenerationStats]:
        """Continue every prompt.

        Args:
          prompts: token-id lists (at least one token each; shorter than the context unless
            `truncate`).
          max_new_tokens: most tokens generated per prompt (fewer when the context fills up).
          sampling: how the next token is chosen (default greedy).
          stop_ids: ids that end a prompt's generation (not included in its output).
          seed: the sampling seed; a fixed seed gives the same text for a prompt whatever its
            batch.
          on_token: called as on_token(prompt index, token id) as each token is chosen
            (streaming); stop ids are not passed.
          progress: print progress on stderr.
          recorder: a `TraceRecorder` that receives every layer's routing of each prompt token
            and each generated token fed back (a prompt's index is its sequence id).
        Returns:
          one `Generation` per prompt, in input order, and the `GenerationStats`.
        """
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if recorder is not None and not isinstance(recorder, TraceRecorder):
            raise ValueError(f"recorder must be a TraceRecorder, got {type(recorder).__name__}")
        if recorder is not None and not self.cfg.moe_layers:
            raise ValueError("recorder: the model has no MoE layers to trace")
        prompts = self.prepare(prompts, max_new_tokens, truncate=truncate)
        stops = _stop_ids(stop_ids)
        if not is_int(seed) or not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32)")
        key = jax.random.key(seed, impl=PRNG_IMPL)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        stats = GenerationStats()
        results: list[Generation | None] = [None] * len(prompts)
        total = sum(min(max_new_tokens, self.context - len(p)) for p in prompts)
        bar = Progress(total, enabled=progress, every=max(1, total // 20), warmup=1)
        done_tokens = 0
        for lo in range(0, len(order), self.batch_size):
            batch = order[lo: lo + self.batch_size]
            for g in self._generate_batch([prompts[i] for i in batch], batch, max_new_tokens, sampling, stops, key,
                                          on_token, stats, recorder):
                results[g.index] = g
                done_tokens += min(max_new_tokens, self.context - len(g.prompt_ids))
            bar.update(done_tokens, {"prompts": f"{min(lo + self.batch_size, len(order))}/{len(order)}",
                                     "tok/s": f"{stats.decode_tokens_per_s:.0f}"})
        bar.close()
        return list(results), stats

    # ------------------------------------------------------------------ one batch

    def _steps(self, B: int, P: int, S: int, sampling: SamplingParams, with_routing: bool = False):
        """The compiled (prefill, decode) of a bucket, compiled on first use. Both return
        (token [B], cache, seen, logits) and, with_routing, the step's routing. Their last
        argument, live [B] bool, marks the rows whose tokens count (the others are padding
        rows or finished; the compiled steps compute them anyway)."""
        key = (B, P, S, sampling, with_routing)
        if key not in self._compiled:
            t0 = time.perf_counter()
            cfg = self.cfg
            pre = jax.jit(partial(_prefill_step, cfg=cfg, max_len=S, sampling=sampling, with_routing=with_routing,
                                  contrast=self.contrast))
            dec = jax.jit(partial(_decode_step, cfg=cfg, sampling=sampling, with_routing=with_routing,
                                  contrast=self.contrast), donate_argnums=(2, 4))
            tokens = jax.ShapeDtypeStruct((B, P), jnp.int32)
            lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
            row_keys = jax.eval_shape(lambda: _row_keys(jax.random.key(0, impl=PRNG_IMPL), np.zeros(B, np.uint32)))
            live = jax.ShapeDtypeStruct((B,), jnp.bool_)
            pre_c = pre.lower(self.params, self.state, tokens, lengths, row_keys, live).compile()
            tok, cache, seen, *_ = jax.eval_shape(pre, self.params, self.state, tokens, lengths, row_keys, live)
            dec_c = dec.lower(self.params, self.state, cache, tok, seen, row_keys, jax.ShapeDtypeStruct((), jnp.int32),
                              live).compile()
            self._compiled[key] = (pre_c, dec_c, time.perf_counter() - t0)
            return pre_c, dec_c, self._compiled[key][2]
        pre_c, dec_c, _ = self._compiled[key]
        return pre_c, dec_c, 0.0

    def _generate_batch(self, prompts, indices, max_new_tokens, sampling, stops, key, on_token, stats, recorder):
        n = len(prompts)
        lens = [len(p) for p in prompts]
        C = self.context
        B = _pow2(n)
        P = min(max(MIN_PROMPT_BUCKET, _pow2(max(lens))), C)
        S = min(max(P, length_bucket(max(lens) + max_new_tokens)), C)
        pre, dec, compile_s = self._steps(B, P, S, sampling, recorder is not None)
        stats.compile_s += compile_s

        tokens = np.zeros((B, P), np.int32)
        lengths = np.ones((B,), np.int32)
        for r, p in enumerate(prompts):
            tokens[r, : len(p)] = p
            lengths[r] = len(p)
        idx = np.zeros((B,), np.uint32)
        idx[:n] = indices
        row_keys = _row_keys(key, idx)
        budget = [min(max_new_tokens, S - L) for L in lens]
        out: list[list[int]] = [[] for _ in range(n)]
        reason: list[str | None] = [None] * n

        seq_ids = idx.astype(np.int64)
        t0 = time.perf_counter()
        rows_live = np.arange(B) < n
        tok, cache, seen, _, *routing = pre(self.params, self.state, jnp.asarray(tokens), jnp.asarray(lengths),
                                            row_keys, jnp.asarray(rows_live))
        tok_h = np.asarray(tok)
        t1 = time.perf_counter()
        stats.prefill_s += t1 - t0
        stats.prompt_tokens += sum(lens)
        if recorder is not None:
            recorder.add(jax.device_get(routing[0]), (np.arange(P)[None, :] < lengths[:, None]) & rows_live[:, None], seq_ids)
        step = 0
        while True:
            for r in range(n):
                if reason[r] is not None:
                    continue
                t = int(tok_h[r])
                if t in stops:
                    reason[r] = "stop"
                    continue
                out[r].append(t)
                if on_token is not None:
                    on_token(indices[r], t)
                if len(out[r]) >= budget[r]:
                    reason[r] = "length" if budget[r] == max_new_tokens else "context"
            live = sum(reason[r] is None for r in range(n))
            if not live:
                break
            step += 1
            rows_live = np.array([r < n and reason[r] is None for r in range(B)])
            tok, cache, seen, _, *routing = dec(self.params, self.state, cache, tok, seen, row_keys, jnp.int32(step),
                                                jnp.asarray(rows_live))
            if recorder is not None:
                recorder.add(jax.device_get(routing[0]), rows_live[:, None], seq_ids)
            tok_h = np.asarray(tok)
            stats.decode_tokens += live
        stats.decode_s += time.perf_counter() - t1
        return [Generation(indices[r], tuple(prompts[r]), tuple(out[r]), reason[r]) for r in range(n)]


def generate(cfg: LMConfig, params: dict, prompts: Sequence[Sequence[int]], *, state: dict | None = None,
             batch_size: int = 32, **kwargs) -> tuple[list[Generation], GenerationStats]:
    """`Engine(cfg, params, state, batch_size=...).generate(prompts, **kwargs)` (see there)."""
    return Engine(cfg, params, state, batch_size=batch_size).generate(prompts, **kwargs)
