"""Merge-coefficient search (`jmoe merge CONFIG OUT_DIR --search --tasks ...`): what
mergekit-evolve does, on a configuration's own numbers.

Every number among a configuration's parameters (top level, per model, per slice and per
slice source; each entry of a layer gradient and the `value` of each filter entry) is a knob,
searched between min(0, 2v) and max(1, 2v) around its value v (rounded for the parameters
the method reads as integers).
CMA-ES (the `cma` package, as mergekit-evolve) explores the knobs, scaled to [0, 1], from the
configuration's values with step size `sigma`; each candidate is merged out of core and scored
by the evaluation suite on the tasks' validation (val) splits. The score of a candidate is the mean
over the tasks of exact-match accuracy, or 2^-(bits per byte) for a text domain (the geometric
mean probability of a byte), so that every task counts on [0, 1], higher better. The
configuration as given is evaluated first, so the best is never worse than it.

The output directory holds, as the search goes, `search.jsonl` (one line per candidate: its
values, score and per-task results) and `best_config.yml` (rewritten at each improvement), so a
stopped search loses nothing it has measured; at the end the best configuration's merge.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from jmoe.merge.mergekit import parse_config
from jmoe.merge.tree import MergeError


@dataclasses.dataclass(frozen=True)
class Knob:
    """One number of the configuration: where it is (keys and list indices into the raw
    configuration), its value there, its range and whether it is an integer."""

    where: tuple
    initial: float
    low: float
    high: float
    integer: bool

    @property
    def name(self) -> str:
        out = ""
        for k in self.where:
            out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else k)
        return out

    def value(self, unit: float) -> float | int:
        """The knob's value at position `unit` in [0, 1] of its range."""
        v = self.low + float(np.clip(unit, 0.0, 1.0)) * (self.high - self.low)
        return int(round(v)) if self.integer else round(v, 6)

    def unit(self) -> float:
        return (self.initial - self.low) / (self.high - self.low)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _numbers(value, where: tuple) -> list[tuple[tuple, float]]:
    """(where, number) of a parameter's value: a number, a layer gradient, a filter list."""
    if _is_number(value):
        return [(where, value)]
    out = []
    if isinstance(value, list):
        for i, v in enumerate(value):
            if _is_number(v):
                out.append((where + (i,), v))
            elif isinstance(v, dict) and _is_number(v.get("value")):
                out.append((where + (i, "value"), v["value"]))
    return out


def knobs(raw: dict) -> list[Knob]:
    """The numbers of a raw configuration's parameters, as knobs (integers where the method's
    table row converts the parameter with int)."""
    from jmoe.merge.mergekit import method_of

    try:
        table = method_of(raw.get("merge_method")).config_params
    except MergeError:
        table = {}
    found = []

    def params(d, where):
        if isinstance(d, dict) and isinstance(d.get("parameters"), dict):
            for k, v in d["parameters"].items():
                integer = getattr(table.get(k), "convert", None) is int
                found.extend((w, n, integer) for w, n in _numbers(v, where + ("parameters", k)))

    params(raw, ())
    for i, m in enumerate(raw.get("models") or []):
        params(m, ("models", i))
    for i, s in enumerate(raw.get("slices") or []):
        params(s, ("slices", i))
        for j, src in enumerate((s or {}).get("sources") or []):
            params(src, ("slices", i, "sources", j))
    out = []
    for where, v, integer in found:
        low, high = min(0.0, 2.0 * v), max(1.0, 2.0 * v)
        out.append(Knob(where, float(v), low, high, integer))
    return out


def with_values(raw: dict, ks: Sequence[Knob], values: Sequence) -> dict:
    """A deep copy of `raw` with each knob set to its value."""
    out = copy.deepcopy(raw)
    for k, v in zip(ks, values):
        node = out
        for key in k.where[:-1]:
            node = node[key]
        node[k.where[-1]] = v
    return out


def task_score(result) -> float:
    """A task's score on [0, 1], higher better: accuracy, or 2^-(bits per byte)."""
    return float(result.value) if result.metric == "exact_match" else float(2.0 ** -result.value)


def evaluator(tasks, *, examples: int = 32, max_windows: int = 16, seed: int = 0) -> Callable[[Path], tuple]:
    """evaluate(model directory) -> (score, {task: metric value}) on the tasks' validation (val) splits."""
    from jmoe import evals
    from jmoe.infer.load import open_model

    def evaluate(path: Path):
        model = open_model(path).load()
        res = evals.evaluate(model, tasks, examples=examples, max_windows=max_windows, split="val", seed=seed)
        return float(np.mean([task_score(r) for r in res])), {r.task: r.value for r in res}

    return evaluate


def search(config: str | Path, out: str | Path, *, evaluate: Callable[[Path], tuple], max_evals: int = 40,
           sigma: float = 0.2, popsize: int | None = None, seed: int = 0, merge_seed: int = 0,
           max_shard_size: int | str = "5GB", log: Callable[[str], None] = print) -> dict:
    """Search the numbers of merge configuration `config` (a YAML file) for the best score of
    `evaluate(model directory) -> (score, details)`; write the search's files and the best
    merge into `out` (see the module docstring). A candidate whose values the method refuses
    (a MergeError), or whose score is not finite, gets the worst score and is logged as such;
    the configuration as given must merge and score, else nothing is written. Returns {"best": raw config, "score",
    "start_score", "evals"}."""
    from jmoe.merge.checkpoints import run_merge

    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
        raise MergeError(f"--search-evals {max_evals!r} must be a positive integer")
    if not sigma > 0:
        raise MergeError(f"--sigma {sigma!r} must be > 0")
    config = Path(config)
    plan = parse_config(config)
    raw, root = plan.raw, config.parent
    ks = knobs(raw)
    if not ks:
        raise MergeError(f"{config}: the configuration has no numeric parameters to search")
    out = Path(out)
    log_path, best_path = out / "search.jsonl", out / "best_config.yml"
    best: dict[str, Any] = {"score": -math.inf}
    anchor = next(p for p in [out.absolute(), *out.absolute().parents] if p.exists())
    scratch = Path(tempfile.mkdtemp(prefix=".jmoe-search-", dir=anchor if anchor.is_dir() else anchor.parent))
    t0 = time.perf_counter()

    def absolute(raw_: dict) -> dict:
        """raw_ with model paths made absolute (the YAML is written elsewhere than read)."""
        r = copy.deepcopy(raw_)

        def fix(d, key):
            if isinstance(d, dict) and isinstance(d.get(key), str) and not (d[key] in ("base", "union") and key ==
                                                                             "tokenizer_source"):
                p = Path(d[key]).expanduser()
                d[key] = str(p if p.is_absolute() else (root / p).resolve())

        fix(r, "base_model")
        fix(r, "tokenizer_source")
        for m in r.get("models") or []:
            fix(m, "model")
        for s in r.get("slices") or []:
            fix(s, "base_model")
            for src in (s or {}).get("sources") or []:
                fix(src, "model")
        return r

    def run(values, n: int) -> float:
        cand = with_values(raw, ks, values)
        record = {"eval": n, "values": {k.name: v for k, v in zip(ks, values)}}
        target = scratch / f"c{n}"
        try:
            run_merge(parse_config(cand, root), target, max_shard_size=max_shard_size, seed=merge_seed, progress=False,
                      log=lambda m: None)
            score, details = evaluate(target)
        except MergeError as e:  # values the method refuses: the worst score
            if n == 0:
                raise MergeError(f"the configuration as given cannot be searched: {e}") from None
            record.update(score=None, invalid=str(e))
            score = -math.inf
        else:
            score = float(score)
            if not math.isfinite(score):
                record.update(score=None, invalid=f"score {score}")
                score = -math.inf
            else:
                record.update(score=score, results=details)
        finally:
            shutil.rmtree(target, ignore_errors=True)
        if n == 0:  # the configuration as given merged and scored: the search's files appear in OUT_DIR
            out.mkdir(parents=True, exist_ok=True)
            log_path.write_text("")
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if score > best["score"]:
            best.update(score=score, raw=cand, eval=n)
            best_path.write_text(yaml.safe_dump(absolute(cand), sort_keys=False))
        log(f"search: {n + 1}/{max_evals} score {score:.4f} (best {best['score']:.4f}) "
            f"{time.perf_counter() - t0:.0f} s")
        return score

    try:
        start = run([int(k.initial) if k.integer else k.initial for k in ks], 0)
        if start == -math.inf:
            raise MergeError("the configuration as given does not score (its evaluation is not finite)")
        n = 1
        if max_evals > 1:
            import cma

            opts = {"bounds": [0.0, 1.0], "seed": seed + 1, "verbose": -9}
            if popsize is not None:
                opts["popsize"] = popsize
            es = cma.CMAEvolutionStrategy([k.unit() for k in ks], sigma, opts)
            while n < max_evals and not es.stop():
                xs = es.ask()[: max_evals - n]
                fs = []
                for x in xs:
                    s = run([k.value(u) for k, u in zip(ks, x)], n)
                    fs.append(1e9 if s == -math.inf else -s)
                    n += 1
                if len(xs) == es.popsize:
                    es.tell(xs, fs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if best["score"] == -math.inf:
        raise MergeError("no candidate configuration could be merged")
    run_merge(parse_config(best["raw"], root), out, max_shard_size=max_shard_size, seed=merge_seed, progress=False,
              log=log)
    log(f"best score {best['score']:.4f} (the configuration as given: {start:.4f}) after {n} evaluations")
    return {"best": absolute(best["raw"]), "score": best["score"], "start_score": start, "evals": n}
