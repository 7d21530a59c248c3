"""`TrainConfig`: optimisation, evaluation and checkpoint cadence of a run."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """steps, batch_size, seq_len: the run's length and batch shape (tokens per step = batch * seq).
    lr, warmup_steps, min_lr_ratio: AdamW with linear warmup then cosine decay to lr * min_lr_ratio.
    weight_decay (matrices only), grad_clip (global norm), b1, b2: the optimiser.
    seed: parameters, batches and routing noise all derive from it.
    data: None/"stdlib" for the embedded corpus, or a text file/directory.
    eval_every, eval_batches: validation cadence and size.
    ckpt_every, keep_ckpts: checkpoint cadence and how many to keep.
    log_every: steps between metrics.jsonl records.
    mesh: None for one device, or a mesh spec such as "data=2,expert=4" (see jmoe.parallel).
    ep_impl, ep_capacity_factor: how MoE layers move tokens on a mesh (jmoe.parallel.ExpertParallel).
    init_from: a run directory whose latest parameters (and router state) start this run, with a
      fresh optimizer (recovery fine-tuning of a merged or compressed model).
    distill_from, distill_weight, distill_temperature: knowledge distillation from another run's
      model: loss = (1 - w) CE + w T^2 KL(teacher_T || student_T) (+ the MoE losses).
    """

    steps: int = 600
    batch_size: int = 32
    grad_accum: int = 1
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    seed: int = 0
    data: str | None = None
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_ckpts: int = 3
    log_every: int = 1
    mesh: str | None = None
    ep_impl: str = "auto"
    ep_capacity_factor: float = 2.0
    init_from: str | None = None
    distill_from: str | None = None
    distill_weight: float = 0.5
    distill_temperature: float = 1.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_batches", "ckpt_every", "keep_ckpts", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name}={v!r} must be a positive integer")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps!r} must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr={self.lr!r} must be > 0")
        if self.mesh is not None:
            from jmoe.parallel.mesh import parse_mesh_spec

            parse_mesh_spec(self.mesh)
        from jmoe.parallel.expert_parallel import EP_IMPLS

        if self.ep_impl not in EP_IMPLS:
            raise ValueError(f"TrainConfig.ep_impl={self.ep_impl!r} is unknown; known: {', '.join(EP_IMPLS)}")
        if not self.ep_capacity_factor > 0:
            raise ValueError(f"TrainConfig.ep_capacity_factor={self.ep_capacity_factor!r} must be > 0")
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"TrainConfig.distill_weight={self.distill_weight!r} must be in [0, 1]")
        if not self.distill_temperature > 0:
            raise ValueError(f"TrainConfig.distill_temperature={self.distill_temperature!r} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")

    def replace(self, **changes) -> "TrainConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"TrainConfig has no field(s) {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in _WRITTEN_WHEN_SET:  # so that the configurations of earlier runs read the same
            if d[name] == _DEFAULTS[name]:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"TrainConfig has no field(s) {', '.join(sorted(unknown))}")
        return cls(**d)


_WRITTEN_WHEN_SET = ("init_from", "distill_from", "distill_weight", "distill_temperature")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
