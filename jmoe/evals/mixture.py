"""Training data from tasks: a byte corpus mixing tasks in given proportions.

A mixture is named by a data spec, `tasks:NAME=WEIGHT,NAME=WEIGHT` (weights default to 1),
which is what `jmoe train --tasks NAMES [--task-mix WEIGHTS]` stores as the run's data, so
`--resume` and `jmoe eval` rebuild the same corpus. Each task gets a share of the training
bytes proportional to its weight: an algorithmic task fills it with train-split examples one
a line, a text domain with its train text (repeated if short). The shares are cut into
blocks of 4 KiB and interleaved, so a training window sees mostly one task. The validation
text is each task's val split, in the same proportions.
"""

from __future__ import annotations

import hashlib

import numpy as np

from jmoe.evals.base import TASKS, Task

PREFIX = "tasks:"
TRAIN_BYTES = 2_000_000
VAL_BYTES = 200_000
BLOCK = 4096


def mix_spec(names: str, weights: str | None = None) -> str:
    """The data spec of `--tasks NAMES [--task-mix WEIGHTS]` (comma-separated), checked."""
    tasks = [n.strip() for n in names.split(",") if n.strip()]
    if not tasks:
        raise ValueError("--tasks names no task; known: " + ", ".join(TASKS.names()))
    if weights is None:
        ws = ["1"] * len(tasks)
    else:
        ws = [w.strip() for w in weights.split(",")]
        if len(ws) != len(tasks):
            raise ValueError(f"--task-mix has {len(ws)} weights for {len(tasks)} tasks")
    spec = PREFIX + ",".join(f"{t}={w}" for t, w in zip(tasks, ws))
    parse_mix(spec)
    return spec


def parse_mix(spec: str) -> list[tuple[Task, float]]:
    """`tasks:NAME=WEIGHT,...` -> [(task, weight)] with weights summing to 1 (ValueError
    naming an unknown task or a bad weight)."""
    if not spec.startswith(PREFIX):
        raise ValueError(f"task mixture {spec!r} must start with {PREFIX!r}")
    out = []
    for part in spec[len(PREFIX):].split(","):
        name, _, w = part.partition("=")
        name = name.strip()
        task = TASKS.get(name)
        try:
            weight = float(w) if w.strip() else 1.0
        except ValueError:
            raise ValueError(f"task mixture: weight {w.strip()!r} of {name!r} is not a number") from None
        if not np.isfinite(weight) or weight <= 0:
            raise ValueError(f"task mixture: weight of {name!r} must be positive, got {w.strip()}")
        if any(t.name == name for t, _ in out):
            raise ValueError(f"task mixture names {name!r} twice")
        out.append((task, weight))
    total = sum(w for _, w in out)
    return [(t, w / total) for t, w in out]


def _fill(task: Task, split: str, nbytes: int, seed: int) -> bytes:
    """nbytes of the task's split text (whole examples for algorithmic tasks)."""
    if task.kind == "bits_per_byte":
        text = task.text(split)
        if not text:
            raise ValueError(f"task {task.name!r} has no {split} text")
        return (text * (nbytes // len(text) + 1))[:nbytes]
    out, size, n = [], 0, max(16, nbytes // 16)
    while size < nbytes:
        lines = [ex.line.encode() for ex in task.examples(split, n, seed, distinct=False)]
        for line in lines:
            out.append(line)
            size += len(line)
            if size >= nbytes:
                break
        seed += 1
    return b"".join(out)


def _interleave(parts: list[bytes]) -> bytes:
    blocks = [[p[i: i + BLOCK] for i in range(0, len(p), BLOCK)] for p in parts]
    out = []
    for i in range(max(len(b) for b in blocks)):
        out.extend(b[i] for b in blocks if i < len(b))
    return b"".join(out)


def task_corpus(spec: str, *, train_bytes: int = TRAIN_BYTES, val_bytes: int = VAL_BYTES, seed: int = 0):
    """The `jmoe.data.Corpus` of a task mixture spec (see the module docstring)."""
    from jmoe.data.corpus import Corpus

    mix = parse_mix(spec)
    train = _interleave([_fill(t, "train", max(BLOCK, int(w * train_bytes)), seed) for t, w in mix])
    val = _interleave([_fill(t, "val", max(BLOCK, int(w * val_bytes)), seed) for t, w in mix])
    digest = hashlib.sha256(train + b"\0" + val).hexdigest()
    return Corpus(train=np.frombuffer(train, np.uint8), val=np.frombuffer(val, np.uint8), source=spec,
                  sha256=digest, num_files=len(mix))
