"""Next-token selection for batched generation: repetition penalty, temperature, top-k, top-p, min-p.

The processors follow Hugging Face transformers' logits processors, in the order its
`generate` applies them: `RepetitionPenaltyLogitsProcessor`, then `TemperatureLogitsWarper`,
`TopKLogitsWarper`, `TopPLogitsWarper` and `MinPLogitsWarper`, each keeping at least one token.

`SamplingParams` is frozen and hashable: pass it as a static argument to `jax.jit`, so that
which stages run (and whether the vocabulary is sorted at all) is decided while tracing:

    step = jax.jit(sample, static_argnames="params")
    ids = step(logits, seen, jax.random.split(key, batch), params=SamplingParams(temperature=0.7, top_p=0.9))
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe.checks import check_key
from jmoe.options import Options, option

__all__ = ["SamplingParams", "process_logits", "sample"]


@dataclasses.dataclass(frozen=True)
class SamplingParams(Options):
    """How the next token is chosen; every default turns its stage off.

    `temperature=0` is greedy decoding: the argmax of the logits after the repetition
    penalty (the other stages cannot change the argmax, so they are skipped).
    """

    temperature: float = option(0.0, ge=0.0, doc="divides the logits; 0 = greedy")
    top_k: int = option(0, ge=0, doc="keep the k most likely tokens; 0 = off")
    top_p: float = option(1.0, gt=0.0, le=1.0, doc="keep the smallest set with probability >= top_p; 1 = off")
    min_p: float = option(0.0, ge=0.0, lt=1.0, doc="drop tokens below min_p times the top probability; 0 = off")
    repetition_penalty: float = option(1.0, gt=0.0, doc="applied once to every seen token; 1 = off")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check(logits, seen, params) -> None:
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    if getattr(logits, "ndim", None) != 2:
        raise ValueError(f"logits must be [B, V], got shape {getattr(logits, 'shape', None)}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if seen is not None:
        if getattr(seen, "shape", None) != logits.shape:
            got = getattr(seen, "shape", None)
            raise ValueError(f"seen must have the shape of logits {tuple(logits.shape)}, got {got}")
        if seen.dtype != jnp.bool_:
            raise ValueError(f"seen must be a bool mask, got {seen.dtype}")


def _penalise(logits: jax.Array, seen: jax.Array | None, penalty: float) -> jax.Array:
    """logits: [B, V] float32; seen: [B, V] bool -> [B, V]: seen scores pushed away from being chosen."""
    if penalty == 1.0 or seen is None:
        return logits
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def _top_k(logits: jax.Array, k: int) -> jax.Array:
    """logits: [B, V] -> [B, V]: scores below the k-th largest at -inf (ties with it are kept)."""
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def _top_p(logits: jax.Array, p: float) -> jax.Array:
    """logits: [B, V] -> [B, V]: only the smallest most-likely set with probability >= p kept.

    As transformers: ascending sort, drop the tokens whose cumulative probability is <= 1 - p,
    never the most likely one. The dropped tokens form a prefix of the sorted row, so one
    threshold per row (the smallest kept score) restores them without a scatter.
    """
    ascending = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    dropped = jnp.sum(cumulative[:, :-1] <= 1.0 - p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ascending, dropped, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _min_p(logits: jax.Array, min_p: float) -> jax.Array:
    """logits: [B, V] -> [B, V]: tokens less likely than min_p times the top probability at -inf."""
    probs = jax.nn.softmax(logits, axis=-1)
    floor = min_p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < floor, -jnp.inf, logits)


def process_logits(logits: jax.Array, seen: jax.Array | None, params: SamplingParams) -> jax.Array:
    """The distribution `sample` draws from, as logits.

    logits: [B, V] float; seen: [B, V] bool (tokens of the prompt or generated so far, for the
    repetition penalty) or None (nothing seen) -> [B, V] float32 with excluded tokens at -inf.
    With `params.temperature == 0` only each row's argmax stays finite.
    """
    _check(logits, seen, params)
    with jax.named_scope("process_logits"):
        x = _penalise(logits.astype(jnp.float32), seen, params.repetition_penalty)
        if params.greedy:
            best = jnp.argmax(x, axis=-1)
            keep = jnp.arange(x.shape[-1])[None, :] == best[:, None]
            return jnp.where(keep, x, -jnp.inf)
        if params.temperature != 1.0:
            x = x / params.temperature
        if 0 < params.top_k < x.shape[-1]:
            x = _top_k(x, params.top_k)
        if params.top_p < 1.0:
            x = _top_p(x, params.top_p)
        if params.min_p > 0.0:
            x = _min_p(x, params.min_p)
        return x


def sample(logits: jax.Array, seen: jax.Array | None, keys: jax.Array, params: SamplingParams) -> jax.Array:
    """The next token of every row.

    logits: [B, V] float; seen: [B, V] bool or None; keys: [B] PRNG keys (typed, or raw
    [B, 2]-style uint32), one per row -> [B] int32 token ids. A row's token depends only on its
    own logits, seen tokens and key. Greedy (`temperature == 0`) ignores the keys.
    """
    _check(logits, seen, params)
    check_key(keys, "keys")
    if getattr(keys, "shape", (None,))[:1] != logits.shape[:1]:
        got = getattr(keys, "shape", None)
        raise ValueError(f"keys must hold one key per row of logits ({logits.shape[0]}), got shape {got}")
    with jax.named_scope("sample"):
        if params.greedy:
            x = _penalise(logits.astype(jnp.float32), seen, params.repetition_penalty)
            return jnp.argmax(x, axis=-1).astype(jnp.int32)
        x = process_logits(logits, seen, params)
        return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
