"""Decoding with a Mowst model (`jmoe.nn.mowst`): the strong model runs only where the weak
expert is unsure.

At each new token the weak expert reads the last `window` tokens and the gate gives its
confidence C. Where C >= threshold the token comes from the weak expert's distribution and
the strong model is not run. A causal strong model must still read every token (its KV
cache), so the tokens it skipped wait: the next time it is needed (C < threshold) it reads
all of them in one cached `extend` call and predicts from the last. The strong model thus
runs once per unsure token instead of once per token; `MowstStats` counts both. At most
`max_pending` tokens wait (then the strong model reads them at once), which bounds the shapes
compiled.

The tokens chosen are those of the teacher-forced rule of `mowst_scores`' threshold routing:
greedy decoding equals taking, at each position, the argmax of the weak logits where
C >= threshold and of the strong logits elsewhere (tested).
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.infer.engine import PRNG_IMPL, Generation, GenerationStats, MIN_PROMPT_BUCKET, length_bucket, prepare_prompts
from jmoe.infer.forward import check_servable, extend, prefill, serving_params
from jmoe.infer.sampling import SamplingParams, sample
from jmoe.nn.mowst import MowstConfig, check_mowst_params, confidence, dispersion, weak_logits
from jmoe.nn.transformer import LMConfig
from jmoe.progress import Progress


@dataclasses.dataclass
class MowstStats(GenerationStats):
    """`GenerationStats` plus the generated tokens that came from the weak expert (the strong
    model skipped) and the strong model's calls after prefill."""

    weak_tokens: int = 0
    strong_calls: int = 0

    @property
    def skip_share(self) -> float:
        """Share of generated tokens that skipped the strong model."""
        return self.weak_tokens / self.decode_tokens if self.decode_tokens else 0.0

    def to_dict(self) -> dict:
        return {**super().to_dict(), "skip_share": self.skip_share}


class MowstDecoder:
    """`MowstDecoder(cfg, params, state, mowst, mcfg, threshold).generate(prompt_ids, ...)`.

    Args:
      cfg: the strong model's `LMConfig`.
      params: its parameters.
      state: its router state, if any.
      mowst: the weak expert and gate (`init_mowst`'s tree, trained by `jmoe.train.mowst`).
      mcfg: their `MowstConfig`.
      threshold: confidence at or above which the weak expert decides a token.
      max_pending: most skipped tokens that wait for the strong model (>= 1).
    """

    def __init__(self, cfg: LMConfig, params: dict, state: dict | None, mowst: dict, mcfg: MowstConfig,
                 threshold: float = 0.5, *, max_pending: int = 8):
        check_servable(cfg)
        check_mowst_params(mowst, cfg.vocab_size, mcfg)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold!r} must be in [0, 1]")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending={max_pending!r} must be an integer >= 1")
        self.cfg, self.state, self.mcfg = cfg, state or {}, mcfg
        self.params = serving_params(params, cfg)
        self.mowst, self.threshold, self.max_pending = mowst, float(threshold), max_pending
        self._fns: dict = {}
        self._extend = partial(extend, cfg=cfg)

    def _fn(self, name: tuple, fn, args, stats: MowstStats):
        """fn jitted and compiled for args on first use (timed into stats.compile_s)."""
        if name not in self._fns:
            t0 = time.perf_counter()
            self._fns[name] = jax.jit(fn).lower(*args).compile()
            stats.compile_s += time.perf_counter() - t0
        return self._fns[name]

    def _sample(self, logits, seen, key, step, sampling):
        """The token sampled from logits [V] (seen [V] bool or None) with key folded by step."""
        return sample(logits[None], None if seen is None else seen[None], jax.random.fold_in(key, step)[None],
                      sampling)[0]

    def _weak_next(self, mowst, window, seen, key, step, sampling):
        """The weak expert at a position: window [window] ids, newest first -> (its confidence [],
        its token [])."""
        logits = weak_logits(mowst["weak"], window[None, None, :], self.mcfg)[0, 0]
        return confidence(mowst["gate"], dispersion(logits)), self._sample(logits, seen, key, step, sampling)

    def _then_weak(self, tok, mowst, window, seen, key, step, sampling):
        """The weak expert's (confidence, token) at the position after token tok."""
        window = jnp.concatenate([tok[None], window[:-1]])
        seen = None if seen is None else seen.at[tok].set(True)
        return self._weak_next(mowst, window, seen, key, step + 1, sampling)

    def _fns_for(self, sampling):
        """The three jitted steps of decoding, each one call per token (host syncs included):
          weak(mowst, window, seen, key, step) -> (confidence, token) at a position
          pick(logits, mowst, window, seen, key, step) -> (the token of the strong logits [V], and
            the weak expert's confidence and token at the next position)
          strong(params, state, pending [1, n], cache, mowst, window, seen, key, step) -> (the
            token after the strong model reads pending, its logits [V], cache, and the next
            position's weak confidence and token)"""
        def weak(mowst, window, seen, key, step):
            return self._weak_next(mowst, window, seen, key, step, sampling)

        def pick(logits, mowst, window, seen, key, step):
            tok = self._sample(logits, seen, key, step, sampling)
            return tok, *self._then_weak(tok, mowst, window, seen, key, step, sampling)

        def strong(params, state, pending, cache, mowst, window, seen, key, step):
            logits, cache = extend(params, state, pending, cache, self.cfg)
            tok = self._sample(logits[0, -1], seen, key, step, sampling)
            return tok, logits[0, -1], cache, *self._then_weak(tok, mowst, window, seen, key, step, sampling)

        return weak, pick, strong

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                 sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (), seed: int = 0,
                 truncate: bool = False, on_token: Callable[[int, int], None] | None = None, progress: bool = False,
                 ) -> tuple[list[Generation], MowstStats]:
        """Continue every prompt (one at a time); arguments as `Engine.generate`'s."""
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        prompts = prepare_prompts(prompts, self.cfg, max_new_tokens, truncate=truncate)
        stats = MowstStats()
        key = jax.random.key(seed, impl=PRNG_IMPL)
        stops = {int(s) for s in stop_ids}
        bar = Progress(len(prompts), enabled=progress, every=max(1, len(prompts) // 20), warmup=1)
        out = []
        for i, p in enumerate(prompts):
            out.append(self._one(i, p, max_new_tokens, sampling, stops, jax.random.fold_in(key, i), on_token, stats))
            bar.update(i + 1, {"skip": f"{stats.skip_share:.0%}", "tok/s": f"{stats.decode_tokens_per_s:.0f}"})
        bar.close()
        return out, stats

    def _one(self, index, prompt, max_new_tokens, sampling, stops, key, on_token, stats):
        cfg, C, w = self.cfg, self.cfg.max_seq_len, self.mcfg.window
        L = len(prompt)
        P = min(max(MIN_PROMPT_BUCKET, 1 << (L - 1).bit_length()), C)
        S = min(max(P, length_bucket(L + max_new_tokens)), C)
        budget = min(max_new_tokens, S - L)
        tokens = np.zeros((1, P), np.int32)
        tokens[0, :L] = prompt
        args = (self.params, self.state, jnp.asarray(tokens), jnp.asarray([L], jnp.int32))
        prefill_fn = self._fn(("prefill", P, S), partial(prefill, cfg=cfg, max_len=S), args, stats)
        t0 = time.perf_counter()
        strong_logits, cache = prefill_fn(*args)
        strong_logits = strong_logits[0]
        stats.prefill_s += time.perf_counter() - t0
        stats.prompt_tokens += L
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = jnp.zeros((cfg.vocab_size,), bool).at[jnp.asarray(prompt)].set(True)
        history = list(prompt)
        pending: list[int] = []  # tokens the strong model has not read yet
        fresh = True  # strong_logits predict the position after history[-1]
        out, reason = [], "length" if budget == max_new_tokens else "context"
        t1, compile_before = time.perf_counter(), stats.compile_s
        weak_fn, pick_fn, strong_fn = self._fns_for(sampling)
        mode = (sampling, seen is None)

        def call(name, fn, *args):
            return self._fn((name, *mode, *(a.shape for a in args if isinstance(a, jax.Array))), fn, args, stats)(*args)

        def window_of(history):
            return jnp.asarray(history[::-1][:w] + [cfg.vocab_size] * max(0, w - len(history)), jnp.int32)

        window = window_of(history)
        conf, weak_tok = jax.device_get(call("weak", weak_fn, self.mowst, window, seen, key, jnp.int32(0)))
        for step in range(budget):
            i = jnp.int32(step)
            if conf >= self.threshold:  # the weak expert decides; the strong model is skipped
                tok, ahead = weak_tok, None
                stats.weak_tokens += 1
            elif fresh:  # the strong model has read every token: its prediction is at hand
                tok, *ahead = jax.device_get(call("pick", pick_fn, strong_logits, self.mowst, window, seen, key, i))
            else:  # the strong model reads the tokens it skipped, then predicts
                stats.strong_calls += 1
                tok, strong_logits, cache, *ahead = call("strong", strong_fn, self.params, self.state,
                                                         jnp.asarray([pending], jnp.int32), cache, self.mowst, window,
                                                         seen, key, i)
                ahead, pending = jax.device_get(ahead), []
            tok = int(tok)
            if tok in stops:
                reason = "stop"
                break
            out.append(tok)
            stats.decode_tokens += 1
            if on_token is not None:
                on_token(index, tok)
            if seen is not None:
                seen = seen.at[tok].set(True)
            history.append(tok)
            pending.append(tok)
            fresh = False
            if len(pending) >= self.max_pending:  # the strong model catches up now
                stats.strong_calls += 1
                strong_logits, cache = call("extend", self._extend, self.params, self.state,
                                            jnp.asarray([pending], jnp.int32), cache)
                strong_logits, pending, fresh = strong_logits[0, -1], [], True
            window = window_of(history)
            if step + 1 < budget:
                conf, weak_tok = ahead if ahead is not None else jax.device_get(
                    call("weak", weak_fn, self.mowst, window, seen, key, jnp.int32(step + 1)))
        stats.decode_s += time.perf_counter() - t1 - (stats.compile_s - compile_before)
        return Generation(index, tuple(prompt), tuple(out), reason)
