"""Tile sizes for the grouped matmul: a small heuristic table per backend, and `TilingTable`,
an immutable record of measured tilings by problem shape.

The ops take the table as an argument (`gmm(..., tilings=table)`); `DEFAULT_TILINGS` holds no
measured entries, so it answers with `heuristic_tiling` everywhere. `jmoe.dispatch.pallas.tuning`
measures tilings and returns a new table; `TilingTable.save`/`load` keep one in a JSON file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Iterable, Mapping, Union

import jax.numpy as jnp

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


def _pow2_at_least(x: int, lo: int) -> int:
    p = lo
    while p < x:
        p *= 2
    return p


def _bucket(m: int) -> int:
    return _pow2_at_least(max(m, 1), 1)


def tuning_key(backend: str, m: int, k: int, n: int, num_groups: int, dtype) -> str:
    """Key of a measured tiling: backend, dtype, m rounded up to a power of two, k, n and groups."""
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


def candidate_tilings(backend: str, m: int, k: int, n: int, num_groups: int, dtype) -> list[Tiling]:
    """The tilings autotuning tries: a per-backend grid of (tm, tk, tn), each shrunk to fit the
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


def _as_tiling(value) -> Tiling:
    tiling = tuple(int(v) for v in value)
    if len(tiling) != 3 or min(tiling) < 1:
        raise ValueError(f"a tiling is three positive ints (tm, tk, tn), got {value!r}")
    return tiling


Entries = Union[Mapping[str, Iterable[int]], Iterable[tuple[str, Iterable[int]]]]


@dataclasses.dataclass(frozen=True)
class TilingTable:
    """Measured tilings by problem shape, over the built-in heuristic.

    An immutable, hashable value: `with_tiling` and `merge` return new tables. `get` answers
    with the entry measured for the shape (keyed by `tuning_key`) if there is one, else with
    `heuristic_tiling`.

    Attributes:
      entries: sorted `(tuning_key, (tm, tk, tn))` pairs; the constructor also takes a mapping
        `{tuning_key: [tm, tk, tn]}` (the JSON form).
    """

    entries: tuple[tuple[str, Tiling], ...] = ()

    def __init__(self, entries: Entries = ()):
        items = entries.items() if isinstance(entries, Mapping) else entries
        normalised = {str(key): _as_tiling(tiling) for key, tiling in items}
        object.__setattr__(self, "entries", tuple(sorted(normalised.items())))

    def get(self, backend: str, m: int, k: int, n: int, num_groups: int, dtype) -> Tiling:
        """(tm, tk, tn) for lhs [m, k] times rhs [num_groups, k, n]: the measured entry for the
        shape if the table has one, else `heuristic_tiling`."""
        measured = dict(self.entries).get(tuning_key(backend, m, k, n, num_groups, dtype))
        return measured or heuristic_tiling(backend, m, k, n, num_groups, dtype)

    def with_tiling(self, backend: str, m: int, k: int, n: int, num_groups: int, dtype, tiling) -> TilingTable:
        """A new table that also maps the shape to `tiling` (replacing an entry for the same key)."""
        return self.merge(TilingTable({tuning_key(backend, m, k, n, num_groups, dtype): tiling}))

    def merge(self, other: TilingTable) -> TilingTable:
        """A new table with the entries of both; `other`'s win where both have a key."""
        return TilingTable({**dict(self.entries), **dict(other.entries)})

    def to_dict(self) -> dict[str, list[int]]:
        """The JSON form: `{tuning_key: [tm, tk, tn]}`."""
        return {key: list(tiling) for key, tiling in self.entries}

    def save(self, path: str | Path) -> None:
        """Write the table to a JSON file (`to_dict`)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> TilingTable:
        """The table of a JSON file written by `save`."""
        return cls(json.loads(Path(path).read_text()))


DEFAULT_TILINGS = TilingTable()  # no measured entries: the heuristic tables above


def load_tilings(path: str | Path) -> TilingTable:
    """The `TilingTable` of a JSON file, read once per file version; ValueError naming the file."""
    p = Path(path)
    try:
        return _load_tilings(str(p.resolve()), p.stat().st_mtime_ns)
    except FileNotFoundError:
        raise ValueError(f"tilings file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"tilings file {path} is not a tiling table: {e}") from None


@functools.lru_cache(maxsize=16)
def _load_tilings(path: str, mtime_ns: int) -> TilingTable:
    return TilingTable.load(path)


def tiling_for(backend: str, m: int, k: int, n: int, num_groups: int, dtype,
               tilings: TilingTable = DEFAULT_TILINGS) -> Tiling:
    """(tm, tk, tn) for lhs [m, k] times rhs [num_groups, k, n] from `tilings` (`TilingTable.get`)."""
    return tilings.get(backend, m, k, n, num_groups, dtype)
