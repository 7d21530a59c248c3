"""`MoEConfig`: the one description of an MoE layer, validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jmoe.registry import ACTIVATIONS, BALANCE_LOSSES, DISPATCHERS, DROPLESS_IMPLS, ROUTERS

BALANCE_SCOPES = ("global", "micro", "sequence")


def canonical_dtype(value: Any, field: str) -> str | None:
    """Return the canonical name ("float32", "bfloat16", ...) of a floating dtype, or None."""
    if value is None:
        return None
    try:
        dt = jnp.dtype(value)
    except TypeError:
        raise ValueError(f"{field}={value!r} is not a dtype") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{field}={value!r} must be a floating dtype")
    return dt.name


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Configuration of one sparse MoE layer.

    Sizes:
      num_experts: E, routed experts.
      top_k: k, experts per token (k <= E).
      d_model: d, token width.
      d_ff: f, hidden width of each routed expert.
      num_shared_experts: experts every token passes through (DeepSeekMoE); they are
        stored fused as one FFN of hidden width `num_shared_experts * d_ff_shared`.
      shared_gate: scale the shared experts' output by sigmoid(x w_g), w_g: [d, 1] (Qwen2-MoE).
      expert_map: router choice i runs expert expert_map[i] (experts merged into shared
        weights keep their router outputs); None: choice i is expert i. With a map the router
        has len(expert_map) outputs and num_experts counts the expert parameter sets.
      d_ff_shared: hidden width of one shared expert (defaults to `d_ff`).

    Routing (`router` names a registry entry, see `jmoe.registry.ROUTERS`):
      renormalize: rescale the k selected weights to sum to 1 (None: the router's default:
        off for softmax top-k, on for sigmoid_bias).
      softmax_after_topk: Mixtral style, select on logits then softmax over the k
        selected logits (mathematically equal to softmax + top-k + renormalize).
      router_jitter: eps of the Switch multiplicative input jitter U(1-eps, 1+eps),
        applied only when a `key` is passed to the layer (training).

    Router-specific options (each router reads its own):
      expert_groups, topk_groups: sigmoid_bias group-limited routing: experts form
        `expert_groups` contiguous groups, each token picks `topk_groups` groups by the sum
        of their two best biased scores, then its top_k experts inside them.
      route_scale: sigmoid_bias multiplier of the normalised gate weights.
      bias_update_rate: gamma of the aux-loss-free bias update b -= gamma * sign(load - mean).
      top_p: top_p threshold (experts are added until their cumulative probability
        exceeds it; top_k is the static upper bound).
      num_null_experts: null_experts: M FLOP-free experts appended to the router.
      num_zero_experts, num_copy_experts, num_constant_experts, gating_residual: moepp
        zero-computation experts and the gating residual across layers.
      zero_compute_loss_weight: moepp's tau, the balance-loss weight of FLOP-free experts.
      recurrent_dim: recurrent router's GRU state width.
      allow_noncausal: permit routers that look at later tokens (expert_choice) in causal
        decoders.

    Dispatch (`dispatch` names a registry entry, see `jmoe.registry.DISPATCHERS`):
      capacity_factor: for "capacity", C = ceil(capacity_factor * T * k / E).
      impl: for "dropless", the grouped-matmul implementation ("auto" picks per backend).
      block_size: rows per chunk of the XLA dropless implementation.

    Numerics:
      dtype: compute dtype of the experts (None: the input's dtype). The router always
        runs in float32.
      param_dtype: dtype of the parameters created by `init_moe`.

    Losses:
      balance_loss: a `jmoe.registry.BALANCE_LOSSES` entry ("switch", "switch_topk_any",
        "seq_aux", "device", "none"), scaled by aux_loss_coef.
      balance_scope: whose counts make the expert fractions f: "global" (the whole optimizer
        batch: every data-parallel shard and gradient-accumulation micro-batch), "micro"
        (each micro-batch and shard), "sequence" (each sequence).
      balance_devices: device groups of the "device" balance loss.
      z_loss_coef: the router z-loss; entropy_loss_coef: the mean router entropy (the
        dynamic loss of top-p routing).
    """

    num_experts: int = 8
    top_k: int = 2
    d_model: int = 512
    d_ff: int = 1024
    router: str = "topk"
    dispatch: str = "dropless"
    impl: str = "auto"
    activation: str = "swiglu"
    renormalize: bool | None = None
    softmax_after_topk: bool = False
    router_jitter: float = 0.0
    capacity_factor: float = 1.25
    block_size: int = 512
    num_shared_experts: int = 0
    d_ff_shared: int | None = None
    shared_gate: bool = False
    expert_map: tuple | None = None
    dtype: str | None = None
    param_dtype: str = "float32"
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    balance_loss: str = "switch"
    balance_scope: str = "global"
    balance_devices: int = 1
    entropy_loss_coef: float = 0.0
    expert_groups: int = 1
    topk_groups: int = 1
    route_scale: float = 1.0
    bias_update_rate: float = 1e-3
    top_p: float = 0.4
    num_null_experts: int = 0
    num_zero_experts: int = 0
    num_copy_experts: int = 0
    num_constant_experts: int = 0
    gating_residual: bool = False
    zero_compute_loss_weight: float = 0.75
    recurrent_dim: int = 128
    allow_noncausal: bool = False

    def __post_init__(self):
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MoEConfig.{name}={v!r} must be a positive integer")

        for name in ("num_experts", "top_k", "d_model", "d_ff", "block_size", "expert_groups", "topk_groups",
                     "balance_devices", "recurrent_dim"):
            positive_int(name)
        for name in ("num_null_experts", "num_zero_experts", "num_copy_experts", "num_constant_experts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"MoEConfig.{name}={v!r} must be an integer >= 0")
        if self.top_k > self.num_experts and not self.expert_map:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} must be <= num_experts={self.num_experts}"
            )
        if isinstance(self.num_shared_experts, bool) or not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(
                f"MoEConfig.num_shared_experts={self.num_shared_experts!r} must be an integer >= 0"
            )
        if self.d_ff_shared is not None:
            positive_int("d_ff_shared")
        if not self.capacity_factor > 0:
            raise ValueError(f"MoEConfig.capacity_factor={self.capacity_factor!r} must be > 0")
        if not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"MoEConfig.router_jitter={self.router_jitter!r} must be in [0, 1)")
        if self.balance_scope not in BALANCE_SCOPES:
            raise ValueError(f"MoEConfig.balance_scope={self.balance_scope!r} must be one of {', '.join(BALANCE_SCOPES)}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"MoEConfig.top_p={self.top_p!r} must be in (0, 1]")
        for name in ("aux_loss_coef", "z_loss_coef", "entropy_loss_coef", "bias_update_rate", "route_scale",
                     "zero_compute_loss_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"MoEConfig.{name}={getattr(self, name)!r} must be >= 0")
        for name, registry in (
            ("router", ROUTERS),
            ("dispatch", DISPATCHERS),
            ("activation", ACTIVATIONS),
            ("balance_loss", BALANCE_LOSSES),
        ):
            if getattr(self, name) not in registry:
                raise ValueError(
                    f"MoEConfig.{name}={getattr(self, name)!r} is unknown; known: "
                    f"{', '.join(registry.names())}"
                )
        if self.impl != "auto" and self.impl not in DROPLESS_IMPLS:
            raise ValueError(
                f"MoEConfig.impl={self.impl!r} is unknown; known: auto, "
                f"{', '.join(DROPLESS_IMPLS.names())}"
            )
        if self.expert_map is not None:
            object.__setattr__(self, "expert_map", tuple(int(e) for e in self.expert_map))
            if not self.expert_map or min(self.expert_map) < 0 or max(self.expert_map) >= self.num_experts:
                raise ValueError(f"MoEConfig.expert_map entries must be expert indices in [0, num_experts={self.num_experts})")
            if self.top_k > len(self.expert_map):
                raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds the {len(self.expert_map)} router outputs of expert_map")
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype, "MoEConfig.dtype"))
        pd = canonical_dtype(self.param_dtype, "MoEConfig.param_dtype")
        if pd is None:
            raise ValueError("MoEConfig.param_dtype must not be None")
        object.__setattr__(self, "param_dtype", pd)
        ROUTERS.get(self.router).validate(self)

    @property
    def num_routed(self) -> int:
        """Router outputs that run an FFN expert (len(expert_map), or num_experts)."""
        return len(self.expert_map) if self.expert_map else self.num_experts

    @property
    def num_choices(self) -> int:
        """Router output width: FFN experts plus the router's FLOP-free experts."""
        return ROUTERS.get(self.router).num_choices(self)

    @property
    def shared_d_ff(self) -> int:
        """Hidden width of the fused shared-expert FFN (0 when there are none)."""
        return self.num_shared_experts * (self.d_ff_shared or self.d_ff)

    def replace(self, **changes) -> "MoEConfig":
        """A copy with `changes` applied (and validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"MoEConfig has no field(s) {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.expert_map is None:  # written only when set, so older configs read the same
            del d["expert_map"]
        else:
            d["expert_map"] = list(self.expert_map)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"MoEConfig has no field(s) {', '.join(sorted(unknown))}")
        return cls(**d)


def fine_grained(cfg: MoEConfig, m: int, num_shared: int = 0) -> MoEConfig:
    """DeepSeekMoE fine-grained expert segmentation, at constant parameters and FLOPs.

    Every expert is split into m experts of width d_ff / m and the router picks m times as
    many; then `num_shared` of the fine-grained experts become shared experts (every token
    uses them) and the routed top-k drops by as many:
      E' = m E - num_shared routed experts, k' = m k - num_shared, width d_ff / m,
      num_shared_experts = num_shared of width d_ff / m.
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1 or cfg.d_ff % m:
        raise ValueError(f"fine_grained: m={m!r} must be a positive integer dividing d_ff={cfg.d_ff}")
    if not 0 <= num_shared < m * cfg.top_k:
        raise ValueError(f"fine_grained: num_shared={num_shared} must be in [0, m * top_k = {m * cfg.top_k})")
    width = cfg.d_ff // m
    return cfg.replace(
        num_experts=m * cfg.num_experts - num_shared,
        top_k=m * cfg.top_k - num_shared,
        d_ff=width,
        num_shared_experts=num_shared,
        d_ff_shared=width if num_shared else None,
    )
