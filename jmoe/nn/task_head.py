"""A multi-task head on a language model: one output per task, mixed from experts by HoME,
MMoE or one shared mixture (`jmoe.nn.home`), over the model's last hidden state.

The head reads the final-normed hidden state h = norm(x) of each position and adds its task's
output to the residual stream before the final norm and the output projection:

    logits = unembed(x + head_t(norm(x)))

Its towers start at zero, so a new head leaves the model's logits unchanged. The model runs
as one task at a time (`TaskHeadConfig.task`, static: one compiled program per task); with
no task chosen the head is off and the model is its trunk. `jmoe task-head` trains a head on
a frozen model over the evaluation suite's tasks (`jmoe.train.task_head`); `jmoe evaluate`
scores each task with its own output and `jmoe generate --task NAME` decodes as one.

Kinds (`head_config`):
  home     HoME: shared, category and task experts with the hierarchy mask, normalised
           Swish experts, feature and self gates; a task's category is its kind (the
           algorithmic tasks are one category, the text domains another)
  mmoe     MMoE: `experts` ReLU experts, a softmax gate and a tower per task
  shared   one gate and one tower for every task: the same mixture without task outputs
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jmoe.nn.home import HoMEConfig, home_apply, home_task_apply, init_home
from jmoe.options import reject_unknown_fields

KINDS = ("home", "mmoe", "shared")


@dataclasses.dataclass(frozen=True)
class TaskHeadConfig:
    """A multi-task head.

    tasks: task names; task i runs tower i (one tower: every task shares it).
    home: the head's `HoMEConfig` (d_in = d_out = the model's d_model).
    kind: "home", "mmoe" or "shared" (what `head_config` built; informative).
    task: the task the model runs as, or None (the head is off).
    """

    tasks: tuple
    home: HoMEConfig
    kind: str = "home"
    task: str | None = None

    def __post_init__(self):
        if isinstance(self.home, dict):
            object.__setattr__(self, "home", HoMEConfig.from_dict(self.home, owner="TaskHeadConfig.home"))
        if not isinstance(self.home, HoMEConfig):
            raise ValueError(f"TaskHeadConfig.home must be a HoMEConfig or a mapping, got {type(self.home).__name__}")
        tasks = self.tasks
        if isinstance(tasks, str) or not isinstance(tasks, (list, tuple)) or not tasks \
                or not all(isinstance(t, str) and t for t in tasks):
            raise ValueError(f"TaskHeadConfig.tasks={tasks!r} must be a non-empty list of task names")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"TaskHeadConfig.tasks={list(tasks)!r} names a task twice")
        object.__setattr__(self, "tasks", tuple(tasks))
        if self.home.num_tasks not in (1, len(tasks)):
            raise ValueError(f"TaskHeadConfig.home has {self.home.num_tasks} towers for {len(tasks)} tasks "
                             "(one per task, or one for all)")
        if self.kind not in KINDS:
            raise ValueError(f"TaskHeadConfig.kind={self.kind!r} is unknown; known: {', '.join(KINDS)}")
        if self.task is not None and self.task not in tasks:
            raise ValueError(f"task {self.task!r} has no output in this model's head; its tasks: {', '.join(tasks)}")

    def tower(self, name: str) -> int:
        """The tower index of task `name`."""
        if name not in self.tasks:
            raise ValueError(f"task {name!r} has no output in this model's head; its tasks: {', '.join(self.tasks)}")
        return 0 if self.home.num_tasks == 1 else self.tasks.index(name)

    def replace(self, **changes) -> "TaskHeadConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {"tasks": list(self.tasks), "home": self.home.to_dict(), "kind": self.kind, "task": self.task}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskHeadConfig":
        reject_unknown_fields(cls, d, "TaskHeadConfig")
        return cls(**d)


def as_task(cfg, name: str, source: str = "the model"):
    """The model config `cfg` (an `LMConfig` with a task head) running as task `name`;
    `source` names the model in the error when it has no head."""
    if cfg.task_head is None:
        raise ValueError(f"{source} has no task head (jmoe task-head trains one)")
    return cfg.replace(task_head=cfg.task_head.replace(task=name))


def head_config(tasks, kind: str, d_model: int, *, hidden: int | None = None, experts: int = 8,
                feature_gate_rank: int = 16) -> TaskHeadConfig:
    """The head of `kind` over `tasks` (`jmoe.evals.Task`s): HoME with one shared, one
    category and one task expert per level; MMoE and shared with `experts` experts.
    hidden: expert width (default d_model)."""
    if kind not in KINDS:
        raise ValueError(f"--head {kind!r} is unknown; known: {', '.join(KINDS)}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("a task head needs at least one task")
    h = d_model if hidden is None else hidden
    names = tuple(t.name for t in tasks)
    if kind == "home":
        kinds = list(dict.fromkeys(t.kind for t in tasks))  # categories in order of first appearance
        home = HoMEConfig(categories=tuple(kinds.index(t.kind) for t in tasks), d_in=d_model, d_out=d_model, hidden=h,
                          feature_gate_rank=feature_gate_rank)
    else:
        home = HoMEConfig.mmoe((0,) * (len(tasks) if kind == "mmoe" else 1), d_model, d_model, h, experts)
    return TaskHeadConfig(tasks=names, home=home, kind=kind)


def init_task_head(key: jax.Array, cfg: TaskHeadConfig) -> dict:
    """`init_home`'s parameters with zero towers: the head starts as no change."""
    params = init_home(key, cfg.home)
    params["towers"] = jax.tree.map(jnp.zeros_like, params["towers"])
    return params


def head_params(cfg: TaskHeadConfig) -> int:
    """Parameters of the head."""
    shapes = jax.eval_shape(lambda: init_home(jax.random.key(0), cfg.home))
    return sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))


def task_head_delta(head: dict, h: jax.Array, cfg: TaskHeadConfig) -> jax.Array:
    """The chosen task's output on normed hidden states h [..., d] -> [..., d] float32."""
    flat = h.reshape(-1, h.shape[-1])
    return home_task_apply(head, flat, cfg.tower(cfg.task), cfg.home).reshape(h.shape)


def task_head_deltas(head: dict, h: jax.Array, task_ids: jax.Array, cfg: TaskHeadConfig) -> tuple[jax.Array, dict]:
    """Each row's own task's output: h [B, S, d], task_ids [B] (indices into cfg.tasks) ->
    ([B, S, d] float32, `home_apply`'s stats)."""
    B, S, d = h.shape
    if task_ids.shape != (B,):
        raise ValueError(f"task_ids must be [B={B}], got shape {task_ids.shape}")
    towers = task_ids if cfg.home.num_tasks > 1 else jnp.zeros_like(task_ids)
    y, stats = home_apply(head, h.reshape(B * S, d), jnp.repeat(towers, S), cfg.home)
    return y.reshape(B, S, d), stats
