"""`MoEConfig`: the one description of an MoE layer, validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jmoe.options import check_fields, option
from jmoe.registry import ACTIVATIONS, BALANCE_LOSSES, DISPATCHERS, ROUTERS, ROUTING_EDITS

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


# Kinds of method a layer selects by name: (config field, its options field, registry).
METHOD_KINDS = (
    ("router", "router_options", ROUTERS),
    ("dispatch", "dispatch_options", DISPATCHERS),
    ("balance_loss", "balance_options", BALANCE_LOSSES),
    ("routing_edit", "routing_edit_options", ROUTING_EDITS),
)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Configuration of one sparse MoE layer: the shared sizes, and the options of the
    router, dispatch and balance loss it selects.

    Counts (one name each, used everywhere):
      num_experts: E, expert parameter sets (the leading axis of `experts/*`).
      num_ffn_choices: router outputs that run an FFN expert: len(expert_map), or E.
      num_choices: the router's output width C: the FFN choices plus the router's FLOP-free
        experts (null, zero, copy, constant); `Routing.num_choices` of its routings.
      top_k: k, choices per token (the static upper bound for dynamic-k routers).

    Sizes:
      d_model: d, token width. d_ff: f, hidden width of each routed expert.
      num_shared_experts: experts every token passes through (DeepSeekMoE); they are
        stored fused as one FFN of hidden width `num_shared_experts * d_ff_shared`.
      d_ff_shared: hidden width of one shared expert (defaults to `d_ff`).
      shared_gate: scale the shared experts' output by sigmoid(x w_g), w_g: [d, 1] (Qwen2-MoE).
      expert_map: router choice i runs expert expert_map[i] (experts merged into shared
        weights keep their router outputs); None: choice i is expert i.

    Methods, each a registry name with its own options (an `jmoe.options.Options`
    dataclass next to the method's code; see `MoEConfig.options_of`):
      router (`jmoe.registry.ROUTERS`) with router_options,
      dispatch (`jmoe.registry.DISPATCHERS`) with dispatch_options,
      balance_loss (`jmoe.registry.BALANCE_LOSSES`) with balance_options,
      routing_edit (`jmoe.registry.ROUTING_EDITS`) with routing_edit_options: a change to
        every routing the router makes, applied at inference (self-contrast decoding's weak
        routing, expert steering); "none" by default.
      Options may be given as the options dataclass, as a dict of its fields, or omitted
      (the method's defaults). `--set moe.<method>.<option>=value` sets one of them.

    Shared by every router:
      router_jitter: eps of the Switch multiplicative input jitter U(1-eps, 1+eps),
        applied only when a `key` is passed to the layer (training).
      allow_noncausal: permit routers that look at later tokens (expert_choice) in causal
        decoders.
      skip_ratio: online expert skipping (MC-MoE): a token drops each selected expert whose
        weight is below skip_ratio times its largest one (`jmoe.routing.skip`); 0 skips none.

    Numerics:
      dtype: compute dtype of the experts (None: the input's dtype). The router always
        runs in float32.
      param_dtype: dtype of the parameters created by `init_moe`.

    Losses:
      aux_loss_coef: weight of the balance loss; z_loss_coef: the router z-loss;
      entropy_loss_coef: the mean router entropy (the dynamic loss of top-p routing).
      balance_scope: whose counts make the expert fractions f: "global" (the whole optimizer
        batch: every data-parallel shard and gradient-accumulation micro-batch), "micro"
        (each micro-batch and shard), "sequence" (each sequence). A balance loss may fix
        its own scope (seq_aux is always per sequence).
    """

    num_experts: int = option(8, ge=1)
    top_k: int = option(2, ge=1)
    d_model: int = option(512, ge=1)
    d_ff: int = option(1024, ge=1)
    router: str = "topk"
    dispatch: str = "dropless"
    activation: str = "swiglu"
    balance_loss: str = "switch"
    router_options: Any = None
    dispatch_options: Any = None
    balance_options: Any = None
    router_jitter: float = option(0.0, ge=0.0, lt=1.0)
    num_shared_experts: int = option(0, ge=0)
    d_ff_shared: int | None = option(None, ge=1)
    shared_gate: bool = False
    expert_map: tuple | None = None
    dtype: Any = None
    param_dtype: Any = "float32"
    aux_loss_coef: float = option(1e-2, ge=0.0)
    z_loss_coef: float = option(1e-3, ge=0.0)
    entropy_loss_coef: float = option(0.0, ge=0.0)
    balance_scope: str = option("global", choices=BALANCE_SCOPES)
    allow_noncausal: bool = False
    skip_ratio: float = option(0.0, ge=0.0, le=1.0)
    routing_edit: str = "none"
    routing_edit_options: Any = None

    def __post_init__(self):
        for name, registry in (
            ("router", ROUTERS),
            ("dispatch", DISPATCHERS),
            ("activation", ACTIVATIONS),
            ("balance_loss", BALANCE_LOSSES),
            ("routing_edit", ROUTING_EDITS),
        ):
            if getattr(self, name) not in registry:
                raise ValueError(
                    f"MoEConfig.{name}={getattr(self, name)!r} is unknown; known: "
                    f"{', '.join(registry.names())}"
                )
        check_fields(self, "MoEConfig")
        for kind, field, registry in METHOD_KINDS:
            object.__setattr__(self, field, _build_options(getattr(self, kind), getattr(self, field), registry, field))
        if self.top_k > self.num_experts and not self.expert_map:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} must be <= num_experts={self.num_experts}"
            )
        if self.expert_map is not None:
            try:
                object.__setattr__(self, "expert_map", tuple(int(e) for e in self.expert_map))
            except (TypeError, ValueError):
                raise ValueError(f"MoEConfig.expert_map={self.expert_map!r} must be a list of expert indices") from None
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
        for _, field, _ in METHOD_KINDS:
            getattr(self, field).validate(self)

    @property
    def num_ffn_choices(self) -> int:
        """Router outputs that run an FFN expert (len(expert_map), or num_experts)."""
        return len(self.expert_map) if self.expert_map else self.num_experts

    @property
    def num_choices(self) -> int:
        """Router output width C: FFN choices plus the router's FLOP-free experts."""
        return ROUTERS.get(self.router).num_choices(self)

    @property
    def shared_d_ff(self) -> int:
        """Hidden width of the fused shared-expert FFN (0 when there are none)."""
        return self.num_shared_experts * (self.d_ff_shared or self.d_ff)

    def options_of(self, name: str):
        """The options of the selected method called `name` (router, dispatch, balance loss or
        routing edit)."""
        for kind, field, _ in METHOD_KINDS:
            if getattr(self, kind) == name:
                return getattr(self, field)
        raise ValueError(
            f"{name!r} is not a method this layer selects (router={self.router!r}, "
            f"dispatch={self.dispatch!r}, balance_loss={self.balance_loss!r}, routing_edit={self.routing_edit!r})"
        )

    def replace(self, **changes) -> "MoEConfig":
        """A copy with `changes` applied (and validated).

        Changing a method resets its options to the new method's defaults unless they are
        given too; options given as a dict update the current ones of an unchanged method.
        """
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(_unknown_fields_message(unknown))
        for kind, field, _ in METHOD_KINDS:
            same_method = changes.get(kind, getattr(self, kind)) == getattr(self, kind)
            if field in changes:
                if isinstance(changes[field], dict) and same_method:
                    changes[field] = {**getattr(self, field).to_dict(), **changes[field]}
            elif not same_method:
                changes[field] = None
        return dataclasses.replace(self, **changes)

    def with_options(self, name: str, **options) -> "MoEConfig":
        """A copy with options of the selected method `name` changed."""
        self.options_of(name)  # a ValueError for a method the layer does not select
        field = next(field for kind, field, _ in METHOD_KINDS if getattr(self, kind) == name)
        return self.replace(**{field: options})

    def to_dict(self) -> dict:
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_options"):
                v = v.to_dict()
                if not v:  # written only when the method has options
                    continue
            elif f.name == "expert_map":
                if v is None:  # written only when set
                    continue
                v = list(v)
            elif f.name == "routing_edit" and v == "none":  # written only when set
                continue
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        """A config from `to_dict`'s output, or from a config.json of an earlier layout."""
        if not isinstance(d, dict):
            raise ValueError(f"a MoE configuration must be a mapping, got {type(d).__name__}")
        d = migrate_moe_dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(_unknown_fields_message(unknown))
        return cls(**d)


def _build_options(name: str, value, registry, field: str):
    cls = registry.options(name)
    owner = f"MoEConfig.{name}"
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls.from_dict(value, owner=owner)
    if type(value) is cls:
        return value
    got = type(value).__name__
    raise ValueError(
        f"MoEConfig.{field} is a {got}, but {registry.kind} {name!r} takes {cls.__name__} "
        f"(pass a dict or {cls.__name__}(...))"
    )


# Fields of the flat layout (before each method owned its options), by the option they became.
_FLAT_RENAMES = {"top_p": "threshold", "balance_devices": "devices"}
_FLAT_OPTIONS = (
    "impl", "renormalize", "softmax_after_topk", "capacity_factor", "block_size", "balance_devices",
    "expert_groups", "topk_groups", "route_scale", "bias_update_rate", "top_p", "num_null_experts",
    "num_zero_experts", "num_copy_experts", "num_constant_experts", "gating_residual",
    "zero_compute_loss_weight", "recurrent_dim",
)


def migrate_moe_dict(d: dict) -> dict:
    """A MoE config dict of any earlier layout in the current one.

    Earlier configs stored every method's options as flat fields (`capacity_factor`,
    `route_scale`, `top_p`, ...). Each moves into the options of the selected method that
    owns it; options of methods the layer does not select were never read and are dropped.
    `renormalize: null` meant "the router's default", which is what omitting it means now.
    """
    flat = [k for k in _FLAT_OPTIONS if k in d]
    if not flat:
        return dict(d)
    out = {k: v for k, v in d.items() if k not in _FLAT_OPTIONS}
    for kind, field, registry in METHOD_KINDS:
        name = out.get(kind, _DEFAULT_METHODS[kind])
        if name not in registry:
            continue  # the constructor names the unknown method
        owned = {f.name for f in dataclasses.fields(registry.options(name))}
        moved = {}
        for k in flat:
            new = _FLAT_RENAMES.get(k, k)
            if new in owned and not (k == "renormalize" and d[k] is None):
                moved[new] = d[k]
        if moved:
            given = out.get(field) or {}
            out[field] = {**moved, **(given if isinstance(given, dict) else given.to_dict())}
    return out


def _unknown_fields_message(unknown) -> str:
    names = sorted(unknown)
    hints = []
    for n in names:
        if n in _FLAT_OPTIONS:
            owners = _option_owners(_FLAT_RENAMES.get(n, n))
            if owners:
                hints.append(f"{n} is an option of {', '.join(owners)} (moe.<method>.{_FLAT_RENAMES.get(n, n)})")
    msg = f"MoEConfig has no field(s) {', '.join(names)}"
    return msg + (f"; {'; '.join(hints)}" if hints else "")


def _option_owners(option_name: str) -> list[str]:
    owners = []
    for _, _, registry in METHOD_KINDS:
        for name in registry.names():
            if option_name in {f.name for f in dataclasses.fields(registry.options(name))}:
                owners.append(f"{registry.kind} {name!r}")
    return owners


_DEFAULT_METHODS = {"router": "topk", "dispatch": "dropless", "balance_loss": "switch", "routing_edit": "none"}


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
