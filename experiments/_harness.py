"""What every experiment shares: the code version, a cache of results keyed by configuration
and code version, and the seeds.

A cached result is stored as `<runs>/<name>-<key>.json`, key = hash(configuration, code
version), where the code version is the hash of the sources of the jmoe modules in use
(`code_version`): a result computed by other code is never reused. Statistics and verdicts: `jmoe.evals.stats`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)


def code_version() -> str:
    """The first 12 hex digits of the sha256 of the sources (paths and contents) of the jmoe
    modules this process has imported.

    Take it once, after the experiment's imports, and key every result with that value: a result
    then depends on the code that can have computed it, so a change to an unrelated part of jmoe
    (the inference engine for a training experiment) keeps its cached runs, and a module that
    jmoe imports lazily later cannot change the key halfway through. An experiment imports what
    it runs (e.g. `jmoe.merge` for expert merging) before taking it.
    """
    files = set()
    for name, module in list(sys.modules.items()):
        f = getattr(module, "__file__", None)
        if (name == "jmoe" or name.startswith("jmoe.")) and f:
            files.add(Path(f).resolve())
    return _hash_sources(frozenset(files))


@functools.lru_cache(maxsize=8)
def _hash_sources(files: frozenset) -> str:
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(p.relative_to(ROOT).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def config_key(config: Any, version: str | None = None) -> str:
    """12 hex digits naming (config, code version); version: a `code_version()` taken
    earlier (default: now)."""
    code = code_version() if version is None else version
    return hashlib.sha256(json.dumps({"config": config, "code": code}, sort_keys=True).encode()).hexdigest()[:12]


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
