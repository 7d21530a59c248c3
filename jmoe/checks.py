"""Checks of arguments at the API's borders that several packages share: each raises a
one-line ValueError naming the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_key(key, name: str = "key"):
    """`key` if it is a PRNG key: typed (`jax.random.key`, of any shape) or raw (`jax.random.PRNGKey`:
    uint32 key data, its last dimension the implementation's key size); a ValueError naming `name`
    otherwise (e.g. a bare seed)."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None:
        if jnp.issubdtype(dtype, jax.dtypes.prng_key):
            return key
        if dtype == jnp.uint32 and len(key.shape) >= 1:
            return key
    what = f"{type(key).__name__} {key!r}" if isinstance(key, (int, float, str)) else (
        f"an array of dtype {dtype} and shape {tuple(key.shape)}" if dtype is not None else type(key).__name__)
    raise ValueError(f"{name} must be a PRNG key (jax.random.key(seed)), got {what}")
