"""`TrainConfig`: optimisation, evaluation and checkpoint cadence of a run."""

from __future__ import annotations

import dataclasses

from jmoe.options import check_fields, option, reject_unknown_fields
from jmoe.parallel.expert_parallel import EP_IMPLS


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
    ep_impl: how MoE layers move tokens on a mesh (jmoe.parallel.ExpertParallel); how many
      token-slots they may drop there is the MoE layer's dispatch ("dropless" or "capacity").
    fssdp_experts: with ep_impl "fssdp", the most experts a MoE layer materialises per step
      (the sparse all-gather's size; None: every expert). The token-slots of experts in use
      beyond the first M are dropped and counted, as a capacity is.
    init_from: a run directory whose latest parameters (and router state) start this run, with a
      fresh optimizer (recovery fine-tuning of a merged or compressed model).
    distill_from, distill_weight, distill_temperature: knowledge distillation from another run's
      model: loss = (1 - w) CE + w T^2 KL(teacher_T || student_T) (+ the MoE losses).
    base_from: fine-tuning with adapters: a run or Hugging Face directory whose model stays
      frozen; only the adapters of the model config (`LMConfig.adapter`) train, and the run's
      checkpoints hold them alone (`jmoe finetune`).
    train_only: names of parameter-tree keys (e.g. ("router",)): only the parameters under
      such a key train, the others stay bitwise unchanged and take no optimizer state
      (router-only fine-tuning of a built or merged MoE model). None: everything trains.
    placement: an expert placement file (`jmoe place`): where each MoE layer's experts (and
      replicas of hot ones) run on the mesh's expert axis from the first step.
    rebalance_every, rebalance_method, redundant_experts: every `rebalance_every` steps (0:
      never) re-place the experts from the expert loads of the steps since the last
      re-placement with `rebalance_method` (a `jmoe.parallel.placement` method), with
      `redundant_experts` extra slots per MoE layer for replicas. The layer's result does not
      depend on the placement, so a re-placement changes no number of the run.
    consistency_weight: THOR's consistency regulariser: every step runs the model twice with
      independent random choices (stochastic routers such as "thor", router jitter) and trains
      on both cross-entropies plus this weight times the mean symmetric KL of their next-token
      distributions (+ both passes' MoE losses); 0 runs one pass.
    """

    steps: int = option(600, ge=1)
    batch_size: int = option(32, ge=1)
    grad_accum: int = option(1, ge=1)
    seq_len: int = option(128, ge=1)
    lr: float = option(3e-3, gt=0.0)
    warmup_steps: int = option(50, ge=0)
    min_lr_ratio: float = option(0.1, ge=0.0, le=1.0)
    weight_decay: float = option(0.1, ge=0.0)
    grad_clip: float = option(1.0, gt=0.0)
    b1: float = option(0.9, ge=0.0, lt=1.0)
    b2: float = option(0.95, ge=0.0, lt=1.0)
    seed: int = option(0, ge=0, lt=2**32)
    data: str | None = None
    eval_every: int = option(100, ge=1)
    eval_batches: int = option(8, ge=1)
    ckpt_every: int = option(100, ge=1)
    keep_ckpts: int = option(3, ge=1)
    log_every: int = option(1, ge=1)
    mesh: str | None = None
    ep_impl: str = option("auto", choices=EP_IMPLS)
    fssdp_experts: int | None = option(None, ge=1)
    init_from: str | None = None
    distill_from: str | None = None
    distill_weight: float = option(0.5, ge=0.0, le=1.0)
    distill_temperature: float = option(1.0, gt=0.0)
    base_from: str | None = None
    train_only: tuple[str, ...] | None = None
    consistency_weight: float = option(0.0, ge=0.0)
    placement: str | None = None
    rebalance_every: int = option(0, ge=0)
    rebalance_method: str = "eplb"
    redundant_experts: int = option(0, ge=0)

    def __post_init__(self):
        if self.train_only is not None:
            names = (self.train_only,) if isinstance(self.train_only, str) else self.train_only
            if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"TrainConfig.train_only={self.train_only!r} must be a non-empty list of parameter names")
            object.__setattr__(self, "train_only", tuple(names))
        check_fields(self, "TrainConfig")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}")
        if self.mesh is not None:
            from jmoe.parallel.mesh import parse_mesh_spec

            parse_mesh_spec(self.mesh)
        if self.fssdp_experts is not None and self.ep_impl != "fssdp":
            raise ValueError(f"TrainConfig.fssdp_experts={self.fssdp_experts} needs ep_impl='fssdp' (got {self.ep_impl!r})")

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
        if isinstance(d, dict):
            d = {k: v for k, v in d.items() if k not in _RETIRED}
        reject_unknown_fields(cls, d, "TrainConfig")
        return cls(**d)


# Fields of earlier layouts that no longer exist: the expert-parallel exchange now sizes its
# buffers from the MoE layer's dispatch and its capacity option.
_RETIRED = ("ep_capacity_factor",)
_WRITTEN_WHEN_SET = ("fssdp_experts", "init_from", "distill_from", "distill_weight", "distill_temperature", "base_from", "train_only",
                     "consistency_weight", "placement", "rebalance_every", "rebalance_method", "redundant_experts")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
