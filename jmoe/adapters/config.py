"""`AdapterConfig`: which adapter a frozen model takes, where, and with what sizes."""

from __future__ import annotations

import dataclasses
from typing import Any

from jmoe.options import check_fields, option, reject_unknown_fields
from jmoe.registry import ADAPTERS

FFN_TARGETS = ("gate", "up", "down")
FFN_WEIGHT = {"gate": "w_gate", "up": "w_up", "down": "w_down"}
MOE_MODES = ("per_expert", "shared")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Trainable adapters on a frozen language model.

    kind: the adapter (`jmoe.registry.ADAPTERS`): "lora", "mixlora" (top-k LoRA experts on
      the FFN), "smora" (each rank of one LoRA is an expert), "dynmole" (LoRA experts per
      projection with Tsallis-entropy hybrid routing), "wemoe" (fine-tunes' task vectors mixed
      per token, built by `jmoe.merge.wemoe`), "twin" (their low-rank exclusive knowledge mixed
      by a softmax router, built by `jmoe.merge.twin_merging`).
    rank: r, the rank of each LoRA (SMoRA: the total number of rank experts).
    alpha: LoRA scale numerator (None: 2 * rank); the delta is (alpha / r) B A x, SMoRA's
      (alpha / top_k) B diag(g) A x.
    num_experts: LoRA experts per layer (MixLoRA) or per projection (DynMoLE).
    top_k: experts per token (MixLoRA), active ranks per token (SMoRA), experts every token
      keeps at least (DynMoLE).
    ffn_targets: FFN projections that take adapters, of "gate", "up", "down".
    attn_targets: attention weights that take a plain LoRA, by their jmoe names ("wq", "wk",
      "wv", "wo"; MLA: "wq" or "wq_a"/"wq_b", "wkv_a", "wkv_b", "wo").
    layers: the layers that take adapters (None: all).
    dropout: dropout rate on the LoRA inputs while training.
    moe_mode: in MoE layers, one LoRA per routed expert ("per_expert") or one shared by all
      routed experts ("shared"), added to their weights.
    options: the kind's own options (see `jmoe.registry.ADAPTERS.options(kind)`).
    """

    kind: str = "lora"
    rank: int = option(8, ge=1)
    alpha: float | None = option(None, gt=0.0)
    num_experts: int = option(8, ge=1)
    top_k: int = option(2, ge=1)
    ffn_targets: tuple = FFN_TARGETS
    attn_targets: tuple = ()
    layers: tuple | None = None
    dropout: float = option(0.0, ge=0.0, lt=1.0)
    moe_mode: str = option("per_expert", choices=MOE_MODES)
    options: Any = None

    def __post_init__(self):
        if self.kind not in ADAPTERS:
            raise ValueError(f"AdapterConfig.kind={self.kind!r} is unknown; known: {', '.join(ADAPTERS.names())}")
        for name in ("ffn_targets", "attn_targets") + (("layers",) if self.layers is not None else ()):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise ValueError(f"AdapterConfig.{name}={value!r} must be a list")
            object.__setattr__(self, name, tuple(value))
        check_fields(self, "AdapterConfig")
        bad = [t for t in self.ffn_targets if t not in FFN_TARGETS]
        if bad:
            raise ValueError(f"AdapterConfig.ffn_targets has {bad[0]!r}; allowed: {', '.join(FFN_TARGETS)}")
        if not self.ffn_targets and not self.attn_targets:
            raise ValueError("AdapterConfig has no targets: set ffn_targets or attn_targets")
        if self.layers is not None:
            for i in self.layers:
                if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                    raise ValueError(f"AdapterConfig.layers entry {i!r} must be a layer index")
            repeated = sorted({i for i in self.layers if self.layers.count(i) > 1})
            if repeated:
                raise ValueError(f"AdapterConfig.layers={list(self.layers)} names layer {repeated[0]} twice")
        cls = ADAPTERS.options(self.kind)
        opts = self.options
        if opts is None:
            opts = cls()
        elif isinstance(opts, dict):
            opts = cls.from_dict(opts, owner=f"AdapterConfig.{self.kind}")
        elif type(opts) is not cls:
            raise ValueError(f"AdapterConfig.options is a {type(opts).__name__}, but adapter {self.kind!r} takes "
                             f"{cls.__name__} (pass a dict)")
        object.__setattr__(self, "options", opts)
        ADAPTERS.get(self.kind).check(self)

    @property
    def lora_alpha(self) -> float:
        return 2.0 * self.rank if self.alpha is None else self.alpha

    @property
    def scaling(self) -> float:
        """alpha / r: the scale of a LoRA delta (SMoRA scales by alpha / top_k instead)."""
        return self.lora_alpha / self.rank

    def applies_to(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def replace(self, **changes) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["options"] = self.options.to_dict()
        for name in ("ffn_targets", "attn_targets", "layers"):
            d[name] = None if d[name] is None else list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        reject_unknown_fields(cls, d, "AdapterConfig")
        return cls(**d)
