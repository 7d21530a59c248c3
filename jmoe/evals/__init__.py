"""Evaluation tasks for byte-level models: algorithmic tasks scored by exact match and text
domains scored in bits per byte, with fixed splits and confidence intervals.

>>> from jmoe import evals
>>> [t.name for t in evals.resolve_tasks("all")]                      # doctest: +SKIP
>>> results = evals.evaluate(jmoe.infer.load("runs/tiny"), evals.resolve_tasks("addition,prose"))  # doctest: +SKIP
"""

from jmoe.evals import algorithmic, text  # noqa: F401  (registers the tasks)
from jmoe.evals.base import SPLITS, TASKS, Example, Task, register_task, resolve_tasks, split_of
from jmoe.evals.score import TaskResult, bits_per_byte, evaluate, exact_match, t_interval, wilson_interval
from jmoe.evals.stats import difference_verdict, goal_verdict, paired_difference, summary

__all__ = [
    "SPLITS",
    "TASKS",
    "Example",
    "Task",
    "TaskResult",
    "bits_per_byte",
    "difference_verdict",
    "goal_verdict",
    "paired_difference",
    "summary",
    "evaluate",
    "exact_match",
    "register_task",
    "resolve_tasks",
    "split_of",
    "t_interval",
    "wilson_interval",
]
