"""Routing traces: which experts each token used at each MoE layer, in processing order.

A trace is what expert-offloading analyses read (`jmoe.infer.locality`, `jmoe.infer.cachesim`):
one row per token, in the order the tokens were processed, and for each MoE layer the k
experts the router chose.

File format `jmoe-routing-trace`, version 1: a NumPy `.npz` (zip) archive with the entries

  format       0-d str     "jmoe-routing-trace"
  version      0-d int     1
  expert_ids   [N, L, k]   int32, the experts of each token at each MoE layer; -1 marks an
                           unused slot (dynamic-k routers leave some slots empty)
  weights      [N, L, k]   float32 combine weights, 0 at unused slots
  num_experts  0-d int     E, the routed experts per layer (ids are in [0, E))
  seq_ids      [N]         int32, the sequence each token belongs to (sequences may interleave,
                           as in batched decoding; each sequence's tokens are in order)
  layers       [L]         int32, optional: the model layer index of each MoE layer
                           (strictly increasing)
  gate_ids     [N, L, k]   int32, optional: the cross-layer gate's guess of each token's
                           experts at each MoE layer (that layer's router applied to the
                           previous MoE layer's input), -1 where there is none (first layer)

N tokens, L MoE layers, k slots per token. Readers ignore entries they do not know, so later
versions can add entries; a change that old readers would misread gets a new version number.

>>> import numpy as np
>>> t = trace_from_routings([np.array([[0, 1], [1, 2]])], [np.ones((2, 2))], None,
...                         num_experts=4, seq_ids=[0, 0])
>>> t.num_tokens, t.num_layers, t.top_k
(2, 1, 2)
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

FORMAT = "jmoe-routing-trace"
VERSION = 1
_REQUIRED = ("expert_ids", "weights", "num_experts", "seq_ids")
_OPTIONAL = ("layers", "gate_ids")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True, eq=False)
class RoutingTrace:
    """The experts of N tokens at L MoE layers, k slots each (see the module docstring).

    Attributes:
      expert_ids: [N, L, k] int32 expert of each slot, -1 where unused.
      weights: [N, L, k] float32 combine weight of each slot, 0 where unused.
      num_experts: E, routed experts per layer.
      seq_ids: [N] int32 sequence of each token.
      layers: [L] int32 model layer index of each MoE layer, or None.
      gate_ids: [N, L, k] int32 cross-layer gate guesses (-1: none), or None.

    Construction validates the fields (`validate`) and stores integer arrays as int32 and
    float arrays as float32.
    """

    expert_ids: np.ndarray
    weights: np.ndarray
    num_experts: int
    seq_ids: np.ndarray
    layers: np.ndarray | None = None
    gate_ids: np.ndarray | None = None

    def __post_init__(self):
        self.validate()
        object.__setattr__(self, "num_experts", int(self.num_experts))
        object.__setattr__(self, "expert_ids", np.ascontiguousarray(self.expert_ids, dtype=np.int32))
        object.__setattr__(self, "weights", np.ascontiguousarray(self.weights, dtype=np.float32))
        object.__setattr__(self, "seq_ids", np.ascontiguousarray(self.seq_ids, dtype=np.int32))
        if self.layers is not None:
            object.__setattr__(self, "layers", np.ascontiguousarray(self.layers, dtype=np.int32))
        if self.gate_ids is not None:
            object.__setattr__(self, "gate_ids", np.ascontiguousarray(self.gate_ids, dtype=np.int32))

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Shapes, dtypes and ranges of every field; a one-line ValueError naming the field."""
        E = self.num_experts
        if not _is_int(E) or E < 1:
            raise ValueError(f"num_experts must be a positive integer, got {E!r}")
        ids = self.expert_ids
        if not isinstance(ids, np.ndarray) or ids.ndim != 3 or min(ids.shape) < 1:
            raise ValueError(f"expert_ids must be a non-empty [N, L, k] array, got {_shape(ids)}")
        if ids.dtype.kind not in "iu":
            raise ValueError(f"expert_ids must hold integers, got dtype {ids.dtype}")
        if ids.min() < -1 or ids.max() >= E:
            raise ValueError(f"expert_ids must lie in [-1, {E}) (-1: unused slot), "
                             f"got values in [{ids.min()}, {ids.max()}]")
        if ids.shape[2] > 1:
            s = np.sort(ids, axis=2)
            dup = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)
            if dup.any():
                n, l, _ = np.argwhere(dup)[0]
                raise ValueError(f"expert_ids repeats an expert within one token and layer (token {n}, layer {l})")
        w = self.weights
        if not isinstance(w, np.ndarray) or w.shape != ids.shape:
            raise ValueError(f"weights must have the shape of expert_ids {ids.shape}, got {_shape(w)}")
        if w.dtype.kind != "f":
            raise ValueError(f"weights must hold floats, got dtype {w.dtype}")
        if not np.isfinite(w).all():
            raise ValueError("weights must be finite (found NaN or inf)")
        if (w[ids < 0] != 0).any():
            raise ValueError("weights must be 0 at unused slots (where expert_ids is -1)")
        s = self.seq_ids
        if not isinstance(s, np.ndarray) or s.shape != (ids.shape[0],):
            raise ValueError(f"seq_ids must be a [N] array with N = {ids.shape[0]} tokens, got {_shape(s)}")
        if s.dtype.kind not in "iu":
            raise ValueError(f"seq_ids must hold integers, got dtype {s.dtype}")
        if s.min() < 0 or s.max() > np.iinfo(np.int32).max:
            raise ValueError(f"seq_ids must lie in [0, 2**31), got values in [{s.min()}, {s.max()}]")
        if self.layers is not None:
            lay = self.layers
            if not isinstance(lay, np.ndarray) or lay.shape != (ids.shape[1],):
                raise ValueError(f"layers must be a [L] array with L = {ids.shape[1]} MoE layers, got {_shape(lay)}")
            if lay.dtype.kind not in "iu" or lay.min() < 0 or (np.diff(lay.astype(np.int64)) <= 0).any():
                raise ValueError(f"layers must be non-negative, strictly increasing integers, got {lay.tolist()}")
        g = self.gate_ids
        if g is not None:
            if not isinstance(g, np.ndarray) or g.shape != ids.shape or g.dtype.kind not in "iu":
                raise ValueError(f"gate_ids must be an integer array of the shape of expert_ids {ids.shape}, "
                                 f"got {_shape(g)}")
            if g.min() < -1 or g.max() >= E:
                raise ValueError(f"gate_ids must lie in [-1, {E}), got values in [{g.min()}, {g.max()}]")

    # -------------------------------------------------------------- properties
    @property
    def num_tokens(self) -> int:
        """N."""
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        """L."""
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        """k, the slots per token (an upper bound for dynamic-k routers)."""
        return int(self.expert_ids.shape[2])

    @property
    def num_sequences(self) -> int:
        """Distinct sequences."""
        return int(np.unique(self.seq_ids).size)

    def layer_ids(self) -> np.ndarray:
        """[L] model layer index of each MoE layer (0..L-1 when the trace does not record them)."""
        return self.layers if self.layers is not None else np.arange(self.num_layers, dtype=np.int32)

    # ---------------------------------------------------------------- file io
    def save(self, path) -> Path:
        """Write the trace to `path` (an .npz archive, compressed) atomically: a temporary file
        in the same directory, then a rename. Returns the path."""
        path = Path(path)
        if not path.parent.is_dir():
            raise ValueError(f"routing trace {path}: directory {path.parent} does not exist")
        arrays = {"format": np.array(FORMAT), "version": np.array(VERSION, dtype=np.int64),
                  "expert_ids": self.expert_ids, "weights": self.weights,
                  "num_experts": np.array(self.num_experts, dtype=np.int64), "seq_ids": self.seq_ids}
        if self.layers is not None:
            arrays["layers"] = self.layers
        if self.gate_ids is not None:
            arrays["gate_ids"] = self.gate_ids
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @staticmethod
    def load(path) -> "RoutingTrace":
        """Read a trace written by `save`; a one-line ValueError naming the file when it is
        missing, not an .npz archive, of another format or version, lacks a field or has
        fields of the wrong shape."""
        return load(path)

    @staticmethod
    def concat(traces: Sequence["RoutingTrace"], *, keep_seq_ids: bool = False) -> "RoutingTrace":
        """The traces one after the other (see `concat`)."""
        return concat(traces, keep_seq_ids=keep_seq_ids)


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if hasattr(x, "shape") else type(x).__name__


def load(path) -> RoutingTrace:
    """Read a routing trace file (see `RoutingTrace.load`)."""
    path = Path(path)
    name = f"routing trace {path}"
    if not path.is_file():
        raise ValueError(f"{name} " + ("is a directory, not a file" if path.is_dir() else "does not exist"))
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{name} is not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as z:
            entries = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        reason = f"{type(e).__name__}: {e}".replace("\n", " ")
        raise ValueError(f"{name} cannot be read as an .npz archive ({reason})") from None
    fmt = entries.get("format")
    if not isinstance(fmt, np.ndarray) or fmt.shape != () or fmt.dtype.kind != "U" or str(fmt) != FORMAT:
        small = isinstance(fmt, np.ndarray) and fmt.size < 4
        got = "none" if fmt is None else repr(fmt.tolist() if small else type(fmt).__name__)
        raise ValueError(f"{name} is not a {FORMAT!r} file (format: {got})")
    ver = entries.get("version")
    if not isinstance(ver, np.ndarray) or ver.shape != () or ver.dtype.kind not in "iu":
        raise ValueError(f"{name} has no integer 'version' entry")
    if int(ver) != VERSION:
        raise ValueError(f"{name} has version {int(ver)}; this jmoe reads version {VERSION}")
    for field in _REQUIRED + _OPTIONAL:
        if field not in entries:
            if field in _OPTIONAL:
                continue
            raise ValueError(f"{name} lacks the field {field!r}")
        if not isinstance(entries[field], np.ndarray):
            raise ValueError(f"{name}: the field {field!r} is not a NumPy array")
    E = entries["num_experts"]
    if E.shape != () or E.dtype.kind not in "iu":
        raise ValueError(f"{name}: num_experts must be an integer scalar, got {_shape(E)} {E.dtype}")
    try:
        return RoutingTrace(expert_ids=entries["expert_ids"], weights=entries["weights"], num_experts=int(E),
                            seq_ids=entries["seq_ids"], layers=entries.get("layers"),
                            gate_ids=entries.get("gate_ids"))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def concat(traces: Sequence[RoutingTrace], *, keep_seq_ids: bool = False) -> RoutingTrace:
    """The tokens of `traces` one after the other, as one trace.

    All traces need the same experts and MoE layers; traces with fewer slots are padded with
    unused slots (-1). Sequence ids are shifted so that the sequences of different traces stay
    apart, unless `keep_seq_ids` (for pieces of the same sequences recorded separately).
    """
    traces = list(traces)
    if not traces:
        raise ValueError("traces must be a non-empty list of RoutingTrace")
    for i, t in enumerate(traces):
        if not isinstance(t, RoutingTrace):
            raise ValueError(f"traces[{i}] must be a RoutingTrace, got {type(t).__name__}")
    first = traces[0]
    for i, t in enumerate(traces[1:], 1):
        if t.num_experts != first.num_experts:
            raise ValueError(f"traces[{i}] has {t.num_experts} experts, traces[0] has {first.num_experts}")
        if t.num_layers != first.num_layers:
            raise ValueError(f"traces[{i}] has {t.num_layers} MoE layers, traces[0] has {first.num_layers}")
        if (t.layers is None) != (first.layers is None) or (
                t.layers is not None and not np.array_equal(t.layers, first.layers)):
            raise ValueError(f"traces[{i}] records other model layers than traces[0]")
    k = max(t.top_k for t in traces)
    with_gates = all(t.gate_ids is not None for t in traces)
    ids, ws, gates, seqs, offset = [], [], [], [], 0
    for t in traces:
        pad = ((0, 0), (0, 0), (0, k - t.top_k))
        ids.append(np.pad(t.expert_ids, pad, constant_values=-1))
        ws.append(np.pad(t.weights, pad))
        if with_gates:
            gates.append(np.pad(t.gate_ids, pad, constant_values=-1))
        s = t.seq_ids.astype(np.int64)
        if not keep_seq_ids:
            s = s + offset
            offset = int(s.max()) + 1
        seqs.append(s)
    return RoutingTrace(expert_ids=np.concatenate(ids), weights=np.concatenate(ws), num_experts=first.num_experts,
                        seq_ids=np.concatenate(seqs), layers=first.layers,
                        gate_ids=np.concatenate(gates) if with_gates else None)


def trace_from_routings(expert_ids_per_layer: Sequence[ArrayLike], weights_per_layer: Sequence[ArrayLike],
                        masks_per_layer: Sequence[ArrayLike | None] | None, num_experts: int, seq_ids: ArrayLike,
                        layers: ArrayLike | None = None) -> RoutingTrace:
    """A trace from per-layer routing arrays (e.g. the `Routing` of each MoE layer).

    Args:
      expert_ids_per_layer: L arrays [T, k_l] of expert ids.
      weights_per_layer: L arrays [T, k_l] of combine weights.
      masks_per_layer: L bool arrays [T, k_l] of the selected slots, or None (all selected);
        a None entry also means all selected.
      num_experts: E routed experts per layer. Ids >= E (FLOP-free experts: null, zero, copy,
        constant) have no weights to load and are recorded as unused slots.
      seq_ids: [T] sequence of each token.
      layers: [L] model layer index of each MoE layer, or None.

    Returns:
      A RoutingTrace with k = max k_l; masked and padding slots hold -1 and weight 0.
    """
    ids_l = [np.asarray(a) for a in expert_ids_per_layer]
    if not ids_l:
        raise ValueError("expert_ids_per_layer must hold one [T, k] array per MoE layer, got none")
    w_l = [np.asarray(a) for a in weights_per_layer]
    if len(w_l) != len(ids_l):
        raise ValueError(f"weights_per_layer has {len(w_l)} arrays for {len(ids_l)} layers of expert ids")
    m_l = ([None] * len(ids_l) if masks_per_layer is None
           else [None if m is None else np.asarray(m) for m in masks_per_layer])
    if len(m_l) != len(ids_l):
        raise ValueError(f"masks_per_layer has {len(m_l)} arrays for {len(ids_l)} layers of expert ids")
    if not _is_int(num_experts) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
    T = ids_l[0].shape[0] if ids_l[0].ndim == 2 else -1
    for l, (i, w, m) in enumerate(zip(ids_l, w_l, m_l)):
        if i.ndim != 2 or i.shape[0] != T or i.dtype.kind not in "iu":
            raise ValueError(f"expert_ids_per_layer[{l}] must be an integer [T, k] array with T = {T}, "
                             f"got {_shape(i)} {i.dtype}")
        if w.shape != i.shape:
            raise ValueError(f"weights_per_layer[{l}] must have shape {i.shape}, got {_shape(w)}")
        if m is not None and m.shape != i.shape:
            raise ValueError(f"masks_per_layer[{l}] must have shape {i.shape}, got {_shape(m)}")
    k = max(i.shape[1] for i in ids_l)
    L = len(ids_l)
    ids = np.full((T, L, k), -1, dtype=np.int32)
    ws = np.zeros((T, L, k), dtype=np.float32)
    for l, (i, w, m) in enumerate(zip(ids_l, w_l, m_l)):
        keep = (i >= 0) & (i < num_experts)
        if m is not None:
            keep &= m.astype(bool)
        kl = i.shape[1]
        ids[:, l, :kl] = np.where(keep, i, -1)
        ws[:, l, :kl] = np.where(keep, w.astype(np.float32), 0.0)
    seq = np.asarray(seq_ids)
    if seq.shape != (T,):
        raise ValueError(f"seq_ids must be a [T] array with T = {T} tokens, got {_shape(seq)}")
    return RoutingTrace(expert_ids=ids, weights=ws, num_experts=int(num_experts), seq_ids=seq,
                        layers=None if layers is None else np.asarray(layers))


def recorder_for(cfg) -> "TraceRecorder":
    """An empty `TraceRecorder` for a model's `LMConfig` (ValueError when it has no MoE layer)."""
    layers = list(cfg.moe_layers)
    if not layers:
        raise ValueError("the model has no MoE layers to trace")
    return TraceRecorder(max(cfg.moe_for(i).num_experts for i in layers), layers)


class TraceRecorder:
    """Collects what the MoE layers of a model chose, step by step, into a `RoutingTrace`.

    The inference engine calls `add` after each prefill and decode step with the step's
    routing (`jmoe.infer.forward.step_routing`, as host arrays); tokens enter the trace in
    processing order (a step's tokens row by row). `trace()` returns what was recorded.

    Args:
      num_experts: E, the routed experts per MoE layer.
      layers: the model layer index of each MoE layer.
    """

    def __init__(self, num_experts: int, layers: Sequence[int]):
        if not _is_int(num_experts) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
        self.num_experts = int(num_experts)
        self.layers = np.asarray(list(layers), dtype=np.int32)
        if self.layers.ndim != 1 or not self.layers.size:
            raise ValueError("layers must list the model layer index of at least one MoE layer")
        self._ids: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self._gates: list[np.ndarray] = []
        self._seqs: list[np.ndarray] = []

    @property
    def num_tokens(self) -> int:
        """Tokens recorded so far."""
        return int(sum(s.size for s in self._seqs))

    def add(self, routing: dict, keep: ArrayLike, seq_ids: ArrayLike) -> None:
        """Record one step.

        Args:
          routing: {"expert_ids", "weights", "gate_ids"}: one [B, n, k_l] array per MoE layer.
          keep: [B, n] bool, the tokens to record (real prompt tokens, live rows).
          seq_ids: [B] the sequence of each row.
        """
        L = self.layers.size
        per_layer = [routing[f] for f in ("expert_ids", "weights", "gate_ids")]
        if any(len(a) != L for a in per_layer):
            raise ValueError(f"routing must hold one array per MoE layer ({L}), got "
                             f"{[len(a) for a in per_layer]}")
        keep = np.asarray(keep, dtype=bool)
        seq = np.asarray(seq_ids)
        if keep.ndim != 2 or seq.shape != keep.shape[:1]:
            raise ValueError(f"keep must be [B, n] and seq_ids [B], got {_shape(keep)} and {_shape(seq)}")
        if not keep.any():
            return
        k = max(np.shape(a)[-1] for a in per_layer[0])
        ids = np.full((int(keep.sum()), L, k), -1, np.int32)
        ws = np.zeros(ids.shape, np.float32)
        gates = np.full(ids.shape, -1, np.int32)
        for l in range(L):
            for out, arrays in ((ids, per_layer[0]), (ws, per_layer[1]), (gates, per_layer[2])):
                a = np.asarray(arrays[l])
                if a.shape[:2] != keep.shape:
                    raise ValueError(f"routing arrays of MoE layer {l} must be [B, n, k] with [B, n] = {keep.shape}, "
                                     f"got {_shape(a)}")
                out[:, l, : a.shape[-1]] = a[keep]
        self._ids.append(ids)
        self._weights.append(ws)
        self._gates.append(gates)
        self._seqs.append(np.broadcast_to(seq[:, None], keep.shape)[keep].astype(np.int32))

    def trace(self) -> RoutingTrace:
        """The recorded tokens as a trace (ValueError when nothing was recorded)."""
        if not self._seqs:
            raise ValueError("no tokens were recorded")
        k = max(a.shape[2] for a in self._ids)
        pad = lambda a, v: np.pad(a, ((0, 0), (0, 0), (0, k - a.shape[2])), constant_values=v)  # noqa: E731
        return RoutingTrace(expert_ids=np.concatenate([pad(a, -1) for a in self._ids]),
                            weights=np.concatenate([pad(a, 0) for a in self._weights]),
                            num_experts=self.num_experts, seq_ids=np.concatenate(self._seqs), layers=self.layers,
                            gate_ids=np.concatenate([pad(a, -1) for a in self._gates]))
