"""Expert placement as data: which device holds which experts, replicas included.

A placement of L MoE layers over n devices with s slots per device is one integer array

  slots [L, n * s]   slots[l, j] = the (logical) expert held by physical slot j of MoE layer l;
                     slot j lives on device j // s.

Every expert of every layer has at least one slot; an expert with r > 1 slots is replicated and
its tokens are split between its r copies. n * s = E is a permutation (no replica); the default
expert-parallel layout, device g holding experts g*E/n .. (g+1)*E/n - 1, is `round_robin`.

Placement algorithms turn routing statistics into placements. Statistics are the per-layer expert
loads and, for affinity-aware methods, the token transitions between consecutive MoE layers:

  PlacementStats.load   [L, E]         token-slots routed to each expert
  PlacementStats.pairs  [L - 1, E, E]  pairs[l, a, b] = tokens with expert a at MoE layer l and b
                                       at MoE layer l + 1 (every pair of their k x k choices)

Two measures judge a placement on statistics (its own or held-out ones):

  excess_load   per layer, (max - mean) / mean of the token-slots each device receives, a
                replicated expert's load split evenly between its copies (0 = perfect balance;
                TensorRT-LLM's "imbalance ratio" of the hottest EP rank)
  traffic       the share of consecutive-layer expert pairs of a token whose experts are on
                different devices (the cross-device token traffic of ExFlow's context-coherent
                expert parallelism), copies chosen evenly and independently

An algorithm is one file with one `PLACEMENTS.add(name, fn, options=...)` line:
`fn(stats, num_devices, num_slots, options) -> slots [L, num_slots]`; `place` checks the
request, runs it and wraps the result.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jmoe.registry import Registry

FORMAT = "jmoe-placement"
VERSION = 1

PLACEMENTS: Registry = Registry("placement method")
# methods that place one copy of each expert (they refuse redundant slots)
NO_REPLICAS: set[str] = set()
# methods that read the inter-layer pairs (they refuse statistics without them)
NEEDS_PAIRS: set[str] = set()


def _int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True, eq=False)
class PlacementStats:
    """Routing statistics of L MoE layers with E experts each (see the module docstring).

    load: [L, E] token-slots per expert; pairs: [L - 1, E, E] consecutive-layer pair counts, or
    None (load-only statistics, e.g. a training run's expert counts); layers: the model layer
    index of each MoE layer, or None.
    """

    load: np.ndarray
    pairs: np.ndarray | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        load = np.asarray(self.load, dtype=np.float64)
        if load.ndim != 2 or min(load.shape) < 1:
            raise ValueError(f"load must be a non-empty [L, E] array, got shape {tuple(load.shape)}")
        if not np.isfinite(load).all() or (load < 0).any():
            raise ValueError("load must be finite and >= 0")
        object.__setattr__(self, "load", load)
        if self.pairs is not None:
            pairs = np.asarray(self.pairs, dtype=np.float64)
            L, E = load.shape
            if pairs.shape != (L - 1, E, E):
                raise ValueError(f"pairs must have shape [L - 1, E, E] = {(L - 1, E, E)} for load {load.shape}, "
                                 f"got {tuple(pairs.shape)}")
            if not np.isfinite(pairs).all() or (pairs < 0).any():
                raise ValueError("pairs must be finite and >= 0")
            object.__setattr__(self, "pairs", pairs)
        if self.layers is not None:
            layers = tuple(int(x) for x in self.layers)
            if len(layers) != load.shape[0]:
                raise ValueError(f"layers names {len(layers)} MoE layers, load has {load.shape[0]}")
            object.__setattr__(self, "layers", layers)

    @property
    def num_layers(self) -> int:
        return self.load.shape[0]

    @property
    def num_experts(self) -> int:
        return self.load.shape[1]

    @staticmethod
    def from_trace(trace) -> "PlacementStats":
        """Loads and consecutive-layer pairs of a routing trace (`jmoe.infer.trace.RoutingTrace`)."""
        from jmoe.infer.locality import pair_counts

        ids = trace.expert_ids.astype(np.int64)  # [N, L, k], -1 = unused
        N, L, k = ids.shape
        E = trace.num_experts
        layer = np.broadcast_to(np.arange(L)[None, :, None], ids.shape)
        used = ids >= 0
        load = np.bincount((layer[used] * E + ids[used]), minlength=L * E).reshape(L, E)
        pairs = pair_counts(trace) if L > 1 else np.zeros((0, E, E))
        layers = None if trace.layers is None else tuple(int(x) for x in trace.layers)
        return PlacementStats(load=load, pairs=pairs, layers=layers)


# ----------------------------------------------------------------------------- the placement


@dataclasses.dataclass(frozen=True, eq=False)
class ExpertPlacement:
    """A placement of `num_experts` experts per MoE layer over `num_devices` devices.

    slots: [L, S] int, the expert of each physical slot (slot j on device j // (S / n)).
    layers: the model layer index of each MoE layer, or None. method, options: how it was made.
    """

    slots: np.ndarray
    num_experts: int
    num_devices: int
    layers: tuple[int, ...] | None = None
    method: str = ""
    options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        slots = np.asarray(self.slots)
        E, n = self.num_experts, self.num_devices
        if not _int(E) or E < 1:
            raise ValueError(f"num_experts must be a positive integer, got {E!r}")
        if not _int(n) or n < 1:
            raise ValueError(f"num_devices must be a positive integer, got {n!r}")
        if slots.ndim != 2 or min(slots.shape) < 1 or slots.dtype.kind not in "iu":
            raise ValueError(f"slots must be a non-empty [L, S] integer array, got shape {tuple(slots.shape)} "
                             f"dtype {slots.dtype}")
        L, S = slots.shape
        if S % n:
            raise ValueError(f"{S} slots per layer do not split evenly over {n} devices")
        if slots.min() < 0 or slots.max() >= E:
            raise ValueError(f"slots must hold expert ids in [0, {E}), got values in [{slots.min()}, {slots.max()}]")
        for l in range(L):
            lost = np.setdiff1d(np.arange(E), slots[l])
            if lost.size:
                raise ValueError(f"the placement loses expert {int(lost[0])} of MoE layer {l} "
                                 f"({lost.size} of {E} experts have no slot there)")
        if self.layers is not None:
            layers = tuple(int(x) for x in self.layers)
            if len(layers) != L:
                raise ValueError(f"layers names {len(layers)} MoE layers, slots has {L}")
            object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "slots", slots.astype(np.int32))
        object.__setattr__(self, "num_experts", int(E))
        object.__setattr__(self, "num_devices", int(n))

    @property
    def num_layers(self) -> int:
        return self.slots.shape[0]

    @property
    def num_slots(self) -> int:
        return self.slots.shape[1]

    @property
    def slots_per_device(self) -> int:
        return self.num_slots // self.num_devices

    def replicas(self) -> np.ndarray:
        """[L, E] copies of each expert."""
        return np.stack([np.bincount(row, minlength=self.num_experts) for row in self.slots])

    def device_of_slot(self) -> np.ndarray:
        """[S] the device of each slot."""
        return np.arange(self.num_slots) // self.slots_per_device

    def shares(self) -> np.ndarray:
        """[L, E, n] the share of each expert's tokens that each device receives (copies split evenly)."""
        L, E, n = self.num_layers, self.num_experts, self.num_devices
        out = np.zeros((L, E, n))
        dev = self.device_of_slot()
        for l in range(L):
            np.add.at(out[l], (self.slots[l], dev), 1.0)
        return out / out.sum(-1, keepdims=True)

    def check_fits(self, num_devices: int, what: str = "the mesh's expert axis") -> None:
        """A one-line ValueError unless the placement is over `num_devices` devices."""
        if num_devices != self.num_devices:
            raise ValueError(f"the placement is over {self.num_devices} devices; {what} has {num_devices}")

    def check_model(self, num_experts: int, layers) -> None:
        """A one-line ValueError unless the placement is for a model with these MoE layers."""
        layers = tuple(int(x) for x in layers)
        if num_experts != self.num_experts:
            raise ValueError(f"the placement is for {self.num_experts} experts per layer; the model has {num_experts}")
        if len(layers) != self.num_layers or (self.layers is not None and tuple(self.layers) != layers):
            raise ValueError(f"the placement is for MoE layers {list(self.layers or range(self.num_layers))}; "
                             f"the model's are {list(layers)}")

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "num_experts": self.num_experts,
                "num_devices": self.num_devices, "slots_per_device": self.slots_per_device,
                "layers": None if self.layers is None else list(self.layers), "method": self.method,
                "options": self.options, "slots": self.slots.tolist()}

    @staticmethod
    def from_dict(d: Any, source: str = "placement") -> "ExpertPlacement":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{source} is not a jmoe placement (no \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION:
            raise ValueError(f"{source}: placement version {d.get('version')!r} is not supported (this jmoe reads "
                             f"{VERSION})")
        for key in ("num_experts", "num_devices", "slots"):
            if key not in d:
                raise ValueError(f"{source}: the placement has no {key!r}")
        try:
            slots = np.asarray(d["slots"])
        except (TypeError, ValueError):
            raise ValueError(f"{source}: slots must be a rectangular list of lists of expert ids") from None
        if slots.dtype == object:
            raise ValueError(f"{source}: slots must be a rectangular list of lists of expert ids")
        try:
            return ExpertPlacement(slots=slots, num_experts=d["num_experts"], num_devices=d["num_devices"],
                             layers=d.get("layers"), method=str(d.get("method", "")),
                             options=dict(d.get("options") or {}))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def save(self, path, extra: dict | None = None) -> Path:
        """Write the placement (and `extra` fields, e.g. measures) as JSON, atomically."""
        from jmoe.train.metrics import atomic_write_text

        path = Path(path)
        atomic_write_text(path, json.dumps({**self.to_dict(), **(extra or {})}, indent=1))
        return path

    @staticmethod
    def load(path) -> "ExpertPlacement":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"placement file {str(path)!r} does not exist")
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"placement file {str(path)!r} is not valid JSON ({type(e).__name__})") from None
        return ExpertPlacement.from_dict(d, source=f"placement file {str(path)!r}")


# ----------------------------------------------------------------------------- measures


def device_load(placement: ExpertPlacement, load: np.ndarray) -> np.ndarray:
    """[L, n] token-slots each device receives: `load` [L, E] split evenly between copies."""
    load = np.asarray(load, dtype=np.float64)
    if load.shape != (placement.num_layers, placement.num_experts):
        raise ValueError(f"load must have shape [L, E] = {(placement.num_layers, placement.num_experts)}, "
                         f"got {tuple(load.shape)}")
    return np.einsum("le,len->ln", load, placement.shares())


def excess_load(placement: ExpertPlacement, load: np.ndarray) -> np.ndarray:
    """[L] (max - mean) / mean of each layer's device loads (0 for a layer without tokens)."""
    d = device_load(placement, load)
    mean = d.mean(-1)
    return np.where(mean > 0, (d.max(-1) - mean) / np.where(mean > 0, mean, 1.0), 0.0)


def traffic(placement: ExpertPlacement, pairs: np.ndarray) -> float:
    """The share of consecutive-layer expert pairs (`pairs` [L - 1, E, E]) whose experts are on
    different devices, each expert's copy chosen evenly and independently (0 without pairs)."""
    pairs = np.asarray(pairs, dtype=np.float64)
    L, E = placement.num_layers, placement.num_experts
    if pairs.shape != (L - 1, E, E):
        raise ValueError(f"pairs must have shape [L - 1, E, E] = {(L - 1, E, E)}, got {tuple(pairs.shape)}")
    total = pairs.sum()
    if total == 0:
        return 0.0
    sh = placement.shares()
    together = sum(float(np.einsum("ab,ag,bg->", pairs[l], sh[l], sh[l + 1])) for l in range(L - 1))
    return float(1.0 - together / total)


def measures(placement: ExpertPlacement, stats: PlacementStats) -> dict:
    """{"excess_load": mean over layers, "excess_load_per_layer": [L], "traffic": share or None}."""
    ex = excess_load(placement, stats.load)
    return {"excess_load": float(ex.mean()), "excess_load_per_layer": [float(x) for x in ex],
            "traffic": None if stats.pairs is None or placement.num_layers < 2 else traffic(placement, stats.pairs)}


# ----------------------------------------------------------------------------- placing


def slots_of(device: np.ndarray) -> np.ndarray:
    """[E] device of each expert (E / n experts on each) -> [E] slots: device by device, experts
    ascending within a device."""
    return np.argsort(np.asarray(device), kind="stable").astype(np.int32)


def place(stats: PlacementStats, method: str, num_devices: int, num_slots: int | None = None,
          options: dict | None = None) -> ExpertPlacement:
    """The placement of `method` for `stats` over `num_devices` devices with `num_slots` slots per
    layer (default E: no replica). Checks the request first (one-line ValueErrors)."""
    fn: Callable = PLACEMENTS.get(method)
    opts = PLACEMENTS.options(method).from_dict(dict(options or {}), owner=f"placement method {method!r}")
    E = stats.num_experts
    if not _int(num_devices) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices!r}")
    S = E if num_slots is None else num_slots
    if not _int(S) or S < E:
        raise ValueError(f"num_slots {S!r} must be an integer >= the {E} experts (one slot each, the rest replicas)")
    if S % num_devices:
        raise ValueError(f"{S} slots per layer do not split evenly over {num_devices} devices")
    if method in NO_REPLICAS and S != E:
        raise ValueError(f"placement method {method!r} places one copy of each expert: num_slots must be {E}, "
                         f"got {S}")
    if method in NEEDS_PAIRS and stats.pairs is None:
        raise ValueError(f"placement method {method!r} needs the inter-layer pairs of a routing trace "
                         "(statistics with load only were given)")
    slots = np.asarray(fn(stats, num_devices, S, opts))
    return ExpertPlacement(slots=slots, num_experts=E, num_devices=num_devices, layers=stats.layers, method=method,
                     options=opts.to_dict())
