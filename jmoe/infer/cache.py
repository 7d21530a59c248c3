"""The static-shape KV cache of batched generation.

One entry per layer, sized for the whole generation up front so that one compiled decode
step serves every position:
  grouped-query / multi-head attention  {"k": [B, S, Hkv, Dh], "v": [B, S, Hkv, Dh]}
    (A attention experts: A * Hkv heads, or Hkv when they share keys and values)
  multi-head latent attention (MLA)     {"latent": [B, S, rkv], "k_rope": [B, S, Dr]}

MLA caches only the compressed key/value latent and the shared rotary key, rkv + Dr values
per token per layer (DeepSeek-V3: 512 + 64, against 2 * 128 * 192 for its expanded heads);
decoding attends in the latent space with the absorbed projections (`jmoe.infer.attention`).
Row b holds its tokens at positions 0 .. lengths[b] - 1; what lies beyond is never read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jmoe.nn.transformer import LMConfig


@struct.dataclass
class KVCache:
    """layers: one dict of arrays per layer (see the module docstring); lengths: [B] int32
    tokens written per row."""

    layers: tuple
    lengths: jax.Array

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return jax.tree.leaves(self.layers)[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self.layers))


def cached_kv_heads(cfg: LMConfig) -> int:
    """Key/value heads a GQA layer caches: Hkv, or A * Hkv for A attention experts with their
    own keys and values (Hkv when they share them)."""
    a = cfg.attention
    return cfg.kv_heads * (a.experts if a.experts and not a.shared_kv else 1)


def values_per_token(cfg: LMConfig) -> int:
    """Cached values per token per layer: rkv + Dr for MLA, 2 * Hkv' * Dh otherwise
    (`cached_kv_heads`)."""
    a = cfg.attention
    if a.kind == "mla":
        return a.kv_lora_rank + a.qk_rope_head_dim
    return 2 * cached_kv_heads(cfg) * cfg.head_dim


def layer_shapes(cfg: LMConfig, batch: int, max_len: int) -> dict[str, tuple[int, ...]]:
    """The shapes of one layer's cache entry."""
    a = cfg.attention
    if a.kind == "mla":
        return {"latent": (batch, max_len, a.kv_lora_rank), "k_rope": (batch, max_len, a.qk_rope_head_dim)}
    hkv = cached_kv_heads(cfg)
    return {"k": (batch, max_len, hkv, cfg.head_dim), "v": (batch, max_len, hkv, cfg.head_dim)}


def init_cache(cfg: LMConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache of `max_len` positions for `batch` rows, in the compute dtype by default."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"a cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
    dt = jnp.dtype(dtype or cfg.dtype or "float32")
    shapes = layer_shapes(cfg, batch, max_len)
    layers = tuple({name: jnp.zeros(shape, dt) for name, shape in shapes.items()} for _ in range(cfg.n_layers))
    return KVCache(layers=layers, lengths=jnp.zeros((batch,), jnp.int32))


def write(entry: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """entry [B, S, ...] with new [B, n, ...] written at positions [B, n] of each row."""
    rows = jnp.arange(entry.shape[0])[:, None]
    return entry.at[rows, positions].set(new.astype(entry.dtype), mode="drop")
