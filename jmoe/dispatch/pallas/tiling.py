"""Tile sizes for the grouped matmul: a small heuristic table per backend, and autotuning.

`tiling_for` answers with a tuned entry when `autotune` (or `load_tuned`) recorded one for
the shape, and with the heuristic otherwise.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Tiling = tuple[int, int, int]

# (tm, tk, tn) by backend and element size; rows per group decide tm.
GPU_TABLE = {
    2: {"small_groups": (64, 64, 256), "large_groups": (128, 64, 256)},  # bf16 / f16 (H100-measured)
    4: {"small_groups": (64, 32, 64), "large_groups": (128, 32, 64)},  # f32
}
TPU_TABLE = {
    2: {"small_groups": (128, 512, 512), "large_groups": (512, 512, 512)},
    4: {"small_groups": (128, 256, 256), "large_groups": (256, 256, 256)},
}
LARGE_GROUP_ROWS = 1024  # average rows per group at which the larger m tile pays off


def gpu_launch(tm: int, tn: int, stage_bytes: int = 0) -> tuple[int, int]:
    """(num_warps, num_stages) of a GPU kernel with an output tile tm x tn whose pipeline
    stage loads `stage_bytes`: 8 warps from 128 x 256 tiles up (4 spill registers there: 7x
    slower on an H100); a 4-deep software pipeline for 256-wide tiles, 3 otherwise (measured
    with experiments/bench_kernels.py), fewer where the stages would not fit in 200 KB of
    shared memory."""
    stages = 4 if tn >= 256 else 3
    while stages > 2 and stages * stage_bytes > 200 * 1024:
        stages -= 1
    return (8 if tm * tn >= 128 * 256 else 4), stages

_TUNED: dict[str, Tiling] = {}


def _pow2_at_least(x: int, lo: int) -> int:
    p = lo
    while p < x:
        p *= 2
    return p


def _bucket(m: int) -> int:
    return _pow2_at_least(max(m, 1), 1)


def tuned_key(backend: str, m: int, k: int, n: int, num_groups: int, dtype) -> str:
    """Key of a recorded tuning: backend, dtype, m rounded up to a power of two, k, n and groups."""
    return f"{backend}:{jnp.dtype(dtype).name}:m{_bucket(m)}:k{k}:n{n}:g{num_groups}"


def heuristic_tiling(backend: str, m: int, k: int, n: int, num_groups: int, dtype) -> Tiling:
    """A tiling from the table, shrunk for small problems (GPU tiles: powers of two >= 16;
    TPU: tm a multiple of 16, tk and tn multiples of 128)."""
    size = jnp.dtype(dtype).itemsize
    rows_per_group = m / max(num_groups, 1)
    key = "large_groups" if rows_per_group >= LARGE_GROUP_ROWS else "small_groups"
    if backend == "tpu":
        tm, tk, tn = TPU_TABLE.get(size, TPU_TABLE[4])[key]
        tm = min(tm, _pow2_at_least(m, 16))
        tk = min(tk, _pow2_at_least(k, 128))
        tn = min(tn, _pow2_at_least(n, 128))
        return tm, tk, tn
    tm, tk, tn = GPU_TABLE.get(size, GPU_TABLE[4])[key]
    return min(tm, _pow2_at_least(m, 16)), min(tk, _pow2_at_least(k, 16)), min(tn, _pow2_at_least(n, 16))


def tiling_for(backend: str, m: int, k: int, n: int, num_groups: int, dtype) -> Tiling:
    """(tm, tk, tn) for lhs [m, k] times rhs [num_groups, k, n]: the tuned entry for the shape
    if one was recorded, else `heuristic_tiling`."""
    return _TUNED.get(tuned_key(backend, m, k, n, num_groups, dtype)) or heuristic_tiling(
        backend, m, k, n, num_groups, dtype
    )


def candidate_tilings(backend: str, m: int, k: int, n: int, num_groups: int, dtype) -> list[Tiling]:
    """The tilings `autotune` tries: a per-backend grid of (tm, tk, tn), each shrunk to fit the
    shape, deduplicated and sorted."""
    if backend == "tpu":
        grid = [(tm, tk, tn) for tm in (128, 256, 512) for tk in (256, 512) for tn in (256, 512)]
    else:
        grid = [(tm, tk, tn) for tm in (64, 128) for tk in (32, 64) for tn in (64, 128, 256)]
    lo = 128 if backend == "tpu" else 16
    fitted = {
        (min(tm, _pow2_at_least(m, 16)), min(tk, _pow2_at_least(k, lo)), min(tn, _pow2_at_least(n, lo)))
        for tm, tk, tn in grid
    }
    return sorted(fitted)


def autotune(
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
) -> dict:
    """Time gmm forward for each candidate tiling on random data with balanced groups and
    record the fastest for the shape. Returns {"best": tiling, "seconds": {tiling: s}}."""
    from jmoe.dispatch.pallas.ops import default_backend, default_interpret, gmm

    backend = backend or default_backend()
    interpret = default_interpret() if interpret is None else interpret
    kl, kr = jax.random.split(jax.random.key(0))
    lhs = jax.random.normal(kl, (m, k), jnp.float32).astype(dtype)
    rhs = jax.random.normal(kr, (num_groups, k, n), jnp.float32).astype(dtype)
    base = m // num_groups
    sizes = jnp.full((num_groups,), base, jnp.int32).at[: m - base * num_groups].add(1)
    seconds = {}
    for tiling in candidates or candidate_tilings(backend, m, k, n, num_groups, dtype):
        fn = jax.jit(lambda a, b, s, t=tiling: gmm(a, b, s, tiling=t, backend=backend, interpret=interpret))
        try:
            jax.block_until_ready(fn(lhs, rhs, sizes))
        except Exception as e:  # a tiling the compiler refuses (e.g. too much shared memory)
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
    if not seconds:
        raise ValueError(f"no candidate tiling ran for m={m}, k={k}, n={n}, groups={num_groups}")
    best = min(seconds, key=seconds.get)
    _TUNED[tuned_key(backend, m, k, n, num_groups, dtype)] = best
    return {"best": best, "seconds": seconds}


def save_tuned(path: str | Path) -> None:
    """Write the recorded tunings to a JSON file ({key: [tm, tk, tn]})."""
    Path(path).write_text(json.dumps({k: list(v) for k, v in sorted(_TUNED.items())}, indent=1))


def load_tuned(path: str | Path) -> None:
    """Record the tunings of a JSON file written by `save_tuned` (replacing entries with the same key)."""
    for k, v in json.loads(Path(path).read_text()).items():
        _TUNED[k] = tuple(int(x) for x in v)
