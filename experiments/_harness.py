"""What every experiment shares: the code version, a cache of results keyed by configuration
and code version, and the seeds.

A cached result is stored as `<runs>/<name>-<key>.json`, key = hash(configuration, code
version), where the code version is the hash of jmoe's sources (`code_version`): a result
computed by other code is never reused. Statistics and verdicts: `jmoe.evals.stats`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The first 12 hex digits of the sha256 of jmoe's sources (paths and contents)."""
    h = hashlib.sha256()
    for p in sorted((ROOT / "jmoe").rglob("*.py")):
        h.update(p.relative_to(ROOT).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def config_key(config: Any) -> str:
    """12 hex digits naming (config, code version)."""
    return hashlib.sha256(json.dumps({"config": config, "code": code_version()}, sort_keys=True).encode()).hexdigest()[:12]


def cached(runs: Path, name: str, config: Any, fn: Callable[[], Any]) -> Any:
    """fn()'s JSON-able result, computed once per (name, config, code version) and stored
    atomically under `runs`."""
    path = Path(runs) / f"{name}-{config_key(config)}.json"
    if path.exists():
        print(f"   reusing {path.name}", flush=True)
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    value = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    print(f"   {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return value
