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

Prompts are decoded in batches. Every row generates one token per step, so the tokens the
strong model has not read are as many in every row: a step runs it (for every row) when any
unfinished row is unsure, and each row takes the weak expert's token where its own C >=
threshold and the strong model's elsewhere. A row's tokens do not depend on the other rows.

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
    model skipped) and the strong model's calls after prefill (one call serves a batch)."""

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
      batch_size: prompts decoded together.
    """

    def __init__(self, cfg: LMConfig, params: dict, state: dict | None, mowst: dict, mcfg: MowstConfig,
                 threshold: float = 0.5, *, max_pending: int = 8, batch_size: int = 32):
        check_servable(cfg)
        check_mowst_params(mowst, cfg.vocab_size, mcfg)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold!r} must be in [0, 1]")
        for name, v in (("max_pending", max_pending), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        self.cfg, self.state, self.mcfg = cfg, state or {}, mcfg
        self.params = serving_params(params, cfg)
        self.mowst, self.threshold, self.max_pending = mowst, float(threshold), max_pending
        self.batch_size = batch_size
        self._fns: dict = {}
        self._extend = partial(extend, cfg=cfg)

    def _fn(self, name: tuple, fn, args, stats: MowstStats):
        """fn jitted and compiled for args on first use (timed into stats.compile_s)."""
        if name not in self._fns:
            t0 = time.perf_counter()
            self._fns[name] = jax.jit(fn).lower(*args).compile()
            stats.compile_s += time.perf_counter() - t0
        return self._fns[name]

    def _fns_for(self, sampling):
        """The three jitted steps of decoding over a batch, each one call per token:
          weak(mowst, windows [B, w], seen, keys [B], step) -> (confidence [B], token [B]) of the
            weak expert at the next position (windows newest first)
          pick(logits [B, V], conf, weak_tok, mowst, windows, seen, keys, step) -> (each row's
            token: the weak one where conf >= threshold, else the one of the strong logits; and
            the weak expert's confidence and token at the position after it)
          strong(params, state, pending [B, n], cache, conf, weak_tok, mowst, windows, seen, keys,
            step) -> (pick's token after the strong model reads pending, its logits [B, V],
            cache, and the next position's weak confidence and token)"""
        threshold = self.threshold

        def draw(logits, seen, keys, step):
            return sample(logits, seen, jax.vmap(lambda k: jax.random.fold_in(k, step))(keys), sampling)

        def weak(mowst, windows, seen, keys, step):
            logits = weak_logits(mowst["weak"], windows[:, None, :], self.mcfg)[:, 0]
            return confidence(mowst["gate"], dispersion(logits)), draw(logits, seen, keys, step)

        def pick(logits, conf, weak_tok, mowst, windows, seen, keys, step):
            tok = jnp.where(conf >= threshold, weak_tok, draw(logits, seen, keys, step))
            windows = jnp.concatenate([tok[:, None], windows[:, :-1]], axis=1)
            seen = None if seen is None else seen.at[jnp.arange(tok.shape[0]), tok].set(True)
            return tok, *weak(mowst, windows, seen, keys, step + 1)

        def strong(params, state, pending, cache, conf, weak_tok, mowst, windows, seen, keys, step):
            logits, cache = extend(params, state, pending, cache, self.cfg)
            last = logits[:, -1]
            tok, next_conf, next_tok = pick(last, conf, weak_tok, mowst, windows, seen, keys, step)
            return tok, last, cache, next_conf, next_tok

        return weak, pick, strong

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                 sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (), seed: int = 0,
                 truncate: bool = False, on_token: Callable[[int, int], None] | None = None, progress: bool = False,
                 ) -> tuple[list[Generation], MowstStats]:
        """Continue every prompt, `batch_size` at a time; arguments as `Engine.generate`'s."""
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        prompts = prepare_prompts(prompts, self.cfg, max_new_tokens, truncate=truncate)
        stats = MowstStats()
        key = jax.random.key(seed, impl=PRNG_IMPL)
        stops = {int(s) for s in stop_ids}
        bar = Progress(len(prompts), enabled=progress, every=max(1, len(prompts) // 20), warmup=1)
        out = []
        for lo in range(0, len(prompts), self.batch_size):
            rows = list(range(lo, min(lo + self.batch_size, len(prompts))))
            out += self._batch(rows, [prompts[i] for i in rows], max_new_tokens, sampling, stops, key, on_token, stats)
            bar.update(rows[-1] + 1, {"skip": f"{stats.skip_share:.0%}", "tok/s": f"{stats.decode_tokens_per_s:.0f}"})
        bar.close()
        return out, stats

    def _batch(self, indices, prompts, max_new_tokens, sampling, stops, key, on_token, stats):
        cfg, C, w = self.cfg, self.cfg.max_seq_len, self.mcfg.window
        B, lengths = len(prompts), [len(p) for p in prompts]
        P = min(max(MIN_PROMPT_BUCKET, 1 << (max(lengths) - 1).bit_length()), C)
        S = min(max(P, length_bucket(max(lengths) + max_new_tokens)), C)
        budgets = [min(max_new_tokens, S - L) for L in lengths]
        tokens = np.zeros((B, P), np.int32)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = p
        args = (self.params, self.state, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32))
        prefill_fn = self._fn(("prefill", B, P, S), partial(prefill, cfg=cfg, max_len=S), args, stats)
        t0 = time.perf_counter()
        strong_logits, cache = prefill_fn(*args)
        stats.prefill_s += time.perf_counter() - t0
        stats.prompt_tokens += sum(lengths)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = jnp.asarray(np.stack([np.isin(np.arange(cfg.vocab_size), p) for p in prompts]))
        windows = np.full((B, w), cfg.vocab_size, np.int32)  # newest first, padded with the weak expert's pad id
        for b, p in enumerate(prompts):
            recent = list(p)[::-1][:w]
            windows[b, :len(recent)] = recent
        pending: list[np.ndarray] = []  # columns of tokens the strong model has not read yet
        fresh = True  # strong_logits predict every row's next position
        outs = [[] for _ in range(B)]
        reasons = ["length" if budgets[b] == max_new_tokens else "context" for b in range(B)]
        live = np.ones(B, bool)
        t1, compile_before = time.perf_counter(), stats.compile_s
        weak_fn, pick_fn, strong_fn = self._fns_for(sampling)
        mode = (sampling, seen is None)

        def call(name, fn, *args):
            return self._fn((name, *mode, *(a.shape for a in args if isinstance(a, jax.Array))), fn, args, stats)(*args)

        conf, weak_tok = jax.device_get(call("weak", weak_fn, self.mowst, jnp.asarray(windows), seen, keys,
                                             jnp.int32(0)))
        step = 0
        while live.any():
            i = jnp.int32(step)
            sure = conf >= self.threshold
            if sure[live].all():  # the weak expert decides every live row; the strong model is skipped
                tok, ahead = np.asarray(weak_tok), None
            elif fresh:  # the strong model has read every token: its predictions are at hand
                tok, *ahead = jax.device_get(call("pick", pick_fn, strong_logits, jnp.asarray(conf),
                                                  jnp.asarray(weak_tok), self.mowst, jnp.asarray(windows), seen, keys, i))
            else:  # the strong model reads the tokens it skipped, then predicts
                stats.strong_calls += 1
                tok, strong_logits, cache, *ahead = call(
                    "strong", strong_fn, self.params, self.state, jnp.asarray(np.stack(pending, 1)), cache,
                    jnp.asarray(conf), jnp.asarray(weak_tok), self.mowst, jnp.asarray(windows), seen, keys, i)
                tok, ahead, pending = np.asarray(tok), jax.device_get(ahead), []
            tok = np.asarray(tok, np.int32)
            for b in np.flatnonzero(live):
                t = int(tok[b])
                if t in stops:
                    reasons[b], live[b] = "stop", False
                    continue
                outs[b].append(t)
                stats.decode_tokens += 1
                stats.weak_tokens += int(sure[b])
                if on_token is not None:
                    on_token(indices[b], t)
                if len(outs[b]) >= budgets[b]:
                    live[b] = False
            if seen is not None:
                seen = seen.at[jnp.arange(B), jnp.asarray(tok)].set(True)
            windows = np.concatenate([tok[:, None], windows[:, :-1]], axis=1)
            pending.append(tok)
            fresh = False
            if not live.any():
                break
            if len(pending) >= self.max_pending:  # the strong model catches up now
                stats.strong_calls += 1
                strong_logits, cache = call("extend", self._extend, self.params, self.state,
                                            jnp.asarray(np.stack(pending, 1)), cache)
                strong_logits, pending, fresh = strong_logits[:, -1], [], True
            step += 1
            conf, weak_tok = ahead if ahead is not None else jax.device_get(
                call("weak", weak_fn, self.mowst, jnp.asarray(windows), seen, keys, jnp.int32(step)))
        stats.decode_s += time.perf_counter() - t1 - (stats.compile_s - compile_before)
        return [Generation(indices[b], tuple(prompts[b]), tuple(outs[b]), reasons[b]) for b in range(B)]
