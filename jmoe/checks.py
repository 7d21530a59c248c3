"""Checks of arguments at the API's borders that several packages share: each raises a
one-line ValueError naming the argument."""

from __future__ import annotations

from numbers import Integral

import jax
import jax.numpy as jnp


def is_int(value) -> bool:
    """Whether `value` is an integer (Python's or NumPy's), a bool not counting as one."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_int(value, name: str, minimum: int = 1) -> int:
    """`value` as an int, or a ValueError naming `name` unless it is an integer >= minimum."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


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
