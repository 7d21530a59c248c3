"""Autotuning of the grouped matmul's tiling: time `gmm` per candidate tiling on the device.

`autotune` returns a new `TilingTable` with the fastest tiling recorded for the shape; nothing
is stored anywhere else. Pass the table to the ops (`gmm(..., tilings=table)`) and keep it with
`table.save(path)` / `TilingTable.load(path)`:

    table = autotune(8192, 4096, 14336, 8, jnp.bfloat16)
    table = autotune(8192, 14336, 4096, 8, jnp.bfloat16, tilings=table)
    table.save("tilings.json")
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.dispatch.pallas.ops import default_backend, default_interpret, gmm
from jmoe.dispatch.pallas.tiling import DEFAULT_TILINGS, Tiling, TilingTable, candidate_tilings


def time_tilings(
    m: int,
    k: int,
    n: int,
    num_groups: int,
    dtype=jnp.bfloat16,
    *,
    backend: str | None = None,
    candidates: Sequence[Tiling] | None = None,
    repeats: int = 5,
    interpret: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[Tiling, float]:
    """Median seconds of the jitted gmm forward, lhs [m, k] times rhs [num_groups, k, n] on random
    data with balanced groups, for each candidate tiling (default `candidate_tilings`). Tilings
    the compiler refuses (e.g. too much shared memory) are left out."""
    backend = backend or default_backend()
    interpret = default_interpret() if interpret is None else interpret
    kl, kr = jax.random.split(jax.random.key(0))
    lhs = jax.random.normal(kl, (m, k), jnp.float32).astype(dtype)
    rhs = jax.random.normal(kr, (num_groups, k, n), jnp.float32).astype(dtype)
    base = m // num_groups
    sizes = jnp.full((num_groups,), base, jnp.int32).at[: m - base * num_groups].add(1)
    seconds = {}
    for tiling in candidates or candidate_tilings(backend, m, k, n, num_groups, dtype):
        tiling = tuple(tiling)
        fn = jax.jit(lambda a, b, s, t=tiling: gmm(a, b, s, tiling=t, backend=backend, interpret=interpret))
        try:
            jax.block_until_ready(fn(lhs, rhs, sizes))
        except Exception as e:  # a tiling the compiler refuses
            if log:
                log(f"  {tiling}: failed ({type(e).__name__})")
            continue
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(lhs, rhs, sizes))
            times.append(time.perf_counter() - t0)
        seconds[tiling] = float(np.median(times))
        if log:
            log(f"  {tiling}: {seconds[tiling] * 1e3:.3f} ms")
    return seconds


def autotune(
    m: int,
    k: int,
    n: int,
    num_groups: int,
    dtype=jnp.bfloat16,
    *,
    tilings: TilingTable = DEFAULT_TILINGS,
    backend: str | None = None,
    candidates: Sequence[Tiling] | None = None,
    repeats: int = 5,
    interpret: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> TilingTable:
    """`tilings` plus the fastest tiling of `time_tilings` for the shape (a new table; `tilings`
    is unchanged). ValueError if no candidate runs."""
    backend = backend or default_backend()
    seconds = time_tilings(m, k, n, num_groups, dtype, backend=backend, candidates=candidates,
                           repeats=repeats, interpret=interpret, log=log)
    if not seconds:
        raise ValueError(f"no candidate tiling ran for m={m}, k={k}, n={n}, groups={num_groups}")
    best = min(seconds, key=seconds.get)
    return tilings.with_tiling(backend, m, k, n, num_groups, dtype, best)
