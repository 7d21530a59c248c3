"""metrics.jsonl: one JSON record per line, appended and flushed as the run goes.

Records carry a "kind": "train" (loss, throughput, per-layer expert load ...) or "eval"
(validation loss, bits per byte). A line cut short by a crash is skipped when reading, and
a resumed run drops the records past its restored step, so the file always describes one
continuous trajectory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file, skipping unreadable lines ([] if the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path`'s contents with `text` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsLog:
    """A metrics.jsonl file: append records, read them back, drop those past a step."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Keep only the records of steps <= step."""
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def records(self) -> list[dict]:
        return read_metrics(self.path)
