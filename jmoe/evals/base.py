"""Evaluation tasks: what a task is, its fixed splits, and the registry.

Two kinds of task, both on bytes (the models are byte-level):

  exact_match    an algorithmic task: examples `prompt -> answer`, rendered one a line as
                 `prompt + answer + "\\n"`; the model is given the prompt, generates greedily
                 until a newline, and scores 1 when its text equals the answer.
  bits_per_byte  a text domain: the mean negative log2-likelihood per byte of held-out text.

Splits are fixed: every example (and every text item: a file, a documentation topic, a
block of code points) goes to "train", "val" or "test" by a hash of its own text (80/10/10),
so a split does not depend on how many examples are drawn or on the order of drawing, and
the three never share an example.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import numpy as np

from jmoe.registry import Registry

SPLITS = ("train", "val", "test")
KINDS = ("exact_match", "bits_per_byte")
ANSWER_END = "\n"


def split_of(text: str) -> str:
    """The split of an example or text item: a hash of its text, 80/10/10."""
    h = int.from_bytes(hashlib.sha1(text.encode()).digest()[:4], "little") % 10
    return "train" if h < 8 else "val" if h == 8 else "test"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} must be one of {', '.join(SPLITS)}")


@dataclasses.dataclass(frozen=True)
class Example:
    """One algorithmic example: the model sees `prompt` and must generate `answer`."""

    prompt: str
    answer: str

    @property
    def line(self) -> str:
        """The example as training text."""
        return self.prompt + self.answer + ANSWER_END


@dataclasses.dataclass(frozen=True)
class Task:
    """An evaluation task.

    name: its registry name.
    kind: "exact_match" or "bits_per_byte".
    description: one line for tables and help.
    draw: exact_match tasks: `draw(rng) -> Example`, one random example.
    items: bits_per_byte tasks: `items() -> list[str]`, the domain's text items.
    """

    name: str
    kind: str
    description: str
    draw: Callable[[np.random.Generator], Example] | None = None
    items: Callable[[], list[str]] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} must be one of {', '.join(KINDS)}")
        if (self.kind == "exact_match") != (self.draw is not None) or (self.kind == "bits_per_byte") != (
                self.items is not None):
            raise ValueError(f"task {self.name!r}: an exact_match task needs draw, a bits_per_byte task items")

    def examples(self, split: str, n: int, seed: int = 0, *, distinct: bool = True) -> list[Example]:
        """n examples of `split` (exact_match tasks), the same for the same seed; distinct
        unless `distinct=False` (training text, which may repeat an example).

        Candidates come from one random stream of (seed, task); each is kept in the split its
        hash gives. Raises ValueError if the task has fewer than n distinct examples there.
        """
        _check_split(split)
        if self.kind != "exact_match":
            raise ValueError(f"task {self.name!r} is a text domain (bits_per_byte): it has text, not examples")
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha1(self.name.encode()).digest()[:4], "little")])
        out, seen = [], set()
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 200 * n + 1000:
                raise ValueError(f"task {self.name!r} has fewer than {n} distinct {split} examples")
            ex = self.draw(rng)
            if (distinct and ex.prompt in seen) or split_of(ex.prompt) != split:
                continue
            seen.add(ex.prompt)
            out.append(ex)
        return out

    def text(self, split: str) -> bytes:
        """The domain's text of `split` (bits_per_byte tasks): its items, in order, joined."""
        _check_split(split)
        if self.kind != "bits_per_byte":
            raise ValueError(f"task {self.name!r} is algorithmic (exact_match): it has examples, not a text")
        return "\n\n".join(t for t in self.items() if split_of(t) == split).encode()

    def training_text(self, n: int, seed: int = 0) -> bytes:
        """What a model trains on for this task: n train examples one a line, or the domain's
        train text (n ignored)."""
        if self.kind == "bits_per_byte":
            return self.text("train")
        return "".join(ex.line for ex in self.examples("train", n, seed)).encode()


TASKS: Registry[Task] = Registry("task")


def register_task(task: Task) -> Task:
    """Add a task to `TASKS` under its name."""
    return TASKS.add(task.name, task)


def resolve_tasks(names: str | list[str]) -> list[Task]:
    """"all", a comma-separated string, or a list of names -> the tasks (ValueError naming an
    unknown one)."""
    if isinstance(names, str):
        names = TASKS.names() if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise ValueError("no task named; known: " + ", ".join(TASKS.names()))
    return [TASKS.get(n) for n in names]
