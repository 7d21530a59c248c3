"""Offloaded experts: run a model whose routed experts live in a slow tier, with a few
device-resident slots per MoE layer, an expert cache, and prefetch of the next layer's experts.

How a step runs (prefill or one decoding step), layer by layer, driven from Python:

  1. attention, the FFN norm and the router of MoE layer j (one compiled function); the
     step's chosen experts come to the host, with the cross-layer gate's guess of the next
     MoE layer's experts (its router on this layer's input and routing carry: exact for the
     `pregate` router) when prefetching by gate;
  2. the layer's cache (`SlotCache`, one per MoE layer, with a replacement policy of
     `jmoe.infer.cachesim`) finds each chosen expert's slot; misses are loaded from the
     store into slots (evicting the policy's victims);
  3. the MoE layer runs on the slots: the layer's own code (`jmoe.layer.layer_body`) with its
     routing passed in and expert ids mapped to slot ids, so routers, shared experts and
     FLOP-free experts behave as in the resident model;
  4. while it computes (JAX dispatches asynchronously), the guessed experts of the next MoE
     layer are loaded into that layer's slots.

A step that needs more experts than a layer has slots runs them in groups of at most that
many (each group loaded, then computed; the partial outputs are summed): prefill usually
does. Outputs equal the all-resident model's: the same arithmetic per token, up to the
order in which a token's k expert outputs are summed (exact for k <= 2; tests compare
greedy tokens and logits).

Slow tiers (`ExpertStore`): "host", every expert's weights as arrays in host memory (JAX's
`pinned_host` memory kind on accelerators, so device transfers are DMA; NumPy arrays on a
CPU device), or
"disk", a safetensors file read through a memory map one expert at a time.

>>> from jmoe.infer import offload                                     # doctest: +SKIP
>>> lm = offload.OffloadedEngine(cfg, params, state, cache_size=4, policy="lru", prefetch="gate")
>>> gens, stats = lm.generate(prompts, max_new_tokens=32)
>>> lm.offload_stats.hit_rate, lm.offload_stats.bytes_per_token
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jmoe.infer.attention import cached_attention, prefill_attention
from jmoe.infer.cache import KVCache, init_cache, write
from jmoe.infer.cachesim import CACHE_POLICIES
from jmoe.infer.engine import Engine, sample_after_decode, sample_after_prefill
from jmoe.infer.forward import gate_routing, serving_moe
from jmoe.infer.predict import LearnedPredictor
from jmoe.layer import ffn_routing, flatten_tokens, layer_body, route, sequence_length
from jmoe.experts import ExpertList, ffn
from jmoe.nn.transformer import LMConfig, attention_block, embed, unembed
from jmoe.quant.qarray import QuantizedArray, dense
from jmoe.registry import DISPATCHERS

TIERS = ("host", "disk")
PREFETCH = ("none", "gate", "learned")
OFFLINE_POLICIES = ("belady",)


# ----------------------------------------------------------------------------- the slow tier
def _expert_leaves(experts: dict) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(experts)
    return [(jax.tree_util.keystr(p, simple=True, separator="."), leaf) for p, leaf in flat]


def _memory(device, kind: str):
    kinds = {m.kind for m in device.addressable_memories()}
    return jax.sharding.SingleDeviceSharding(device, memory_kind=kind) if kind in kinds else None


class ExpertStore:
    """Every MoE layer's routed experts in a slow tier; `fetch(j, e)` brings expert e of MoE
    layer j to the device (a pytree shaped like one expert's weights).

    Quantized experts stay quantized in the store and in transfers (`expert_bytes` counts
    their codes, scales and zero points). A layer whose experts have different widths (an
    `ExpertList`) is stored expert by expert and dequantized on the device after the
    transfer, since one slot array cannot hold several widths (`dense_slots`).

    Build with `ExpertStore.build(cfg, params, tier=..., path=...)`, which also returns the
    parameters without the experts (what stays resident).
    """

    def __init__(self, tier: str, entries: list[list[tuple]], expert_bytes: list[list[int]], dense_slots: list[bool],
                 shapes: dict[str, tuple], read, device):
        self.tier, self.entries, self.expert_bytes, self.dense_slots = tier, entries, expert_bytes, dense_slots
        self._shapes = shapes  # store key -> (shape, dtype)
        self.num_experts = [len(layer) for layer in entries]
        self._read, self.device = read, device
        self._to_device = _memory(device, "device")

    @property
    def num_layers(self) -> int:
        return len(self.entries)

    @property
    def total_bytes(self) -> int:
        """Bytes of every expert of every MoE layer."""
        return int(sum(sum(layer) for layer in self.expert_bytes))

    def bytes_of(self, j: int, e: int) -> int:
        """Stored bytes of expert e of MoE layer j (what a load moves)."""
        return self.expert_bytes[j][e]

    def fetch(self, j: int, e: int):
        """Expert e of MoE layer j on the device (the transfer is asynchronous)."""
        treedef, keys = self.entries[j][e]
        leaves = [jax.device_put(self._read(key, index), self._to_device or self.device) for key, index in keys]
        expert = jax.tree.unflatten(treedef, leaves)
        return jax.tree.map(dense, expert, is_leaf=_is_quantized) if self.dense_slots[j] else expert

    def slot_prototype(self, j: int):
        """One expert's weights as the slots of layer j hold them (shapes and dtypes)."""
        treedef, keys = self.entries[j][0]
        proto = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(self._shape(key, index), self._dtype(key))
                                             for key, index in keys])
        if self.dense_slots[j]:
            return jax.tree.map(lambda q: jax.ShapeDtypeStruct(q.shape, q.dtype), proto, is_leaf=_is_quantized)
        return proto

    @classmethod
    def build(cls, cfg: LMConfig, params: dict, *, tier: str = "host", path: str | Path | None = None,
              device=None) -> tuple["ExpertStore", dict]:
        """Move the routed experts of `params` into a slow tier.

        Args:
          tier: "host" (host memory; pinned where the device has a pinned_host memory) or
            "disk" (a safetensors file at `path`, written here, read through a memory map).
          path: the safetensors file for tier "disk" (its directory must exist).
        Returns:
          the store, and `params` with every MoE layer's "experts" removed.
        """
        if tier not in TIERS:
            raise ValueError(f"tier {tier!r} must be one of {', '.join(TIERS)}")
        device = device or jax.devices()[0]
        layers = list(cfg.moe_layers)
        if not layers:
            raise ValueError("the model has no MoE layers: there are no experts to offload")
        entries, nbytes, dense_slots, arrays, single = [], [], [], {}, set()
        resident = {**params, "layers": dict(params["layers"])}
        for j, i in enumerate(layers):
            moe_p = params["layers"][str(i)]["moe"]
            experts = moe_p["experts"]
            if isinstance(experts, ExpertList):  # one tree per expert
                layer_entries, layer_bytes = [], []
                for e, one in enumerate(experts.experts):
                    leaves = _expert_leaves(one)
                    for n, x in leaves:
                        arrays[f"moe{j}.e{e}.{n}"] = np.asarray(x)
                        single.add(f"moe{j}.e{e}.{n}")
                    layer_entries.append((jax.tree.structure(one), [(f"moe{j}.e{e}.{n}", None) for n, _ in leaves]))
                    layer_bytes.append(int(sum(x.size * np.dtype(x.dtype).itemsize for _, x in leaves)))
                widths = {jax.tree.structure(one) for one in experts.experts}
                dense_slots.append(len(widths) > 1)
            else:  # stacked [E, ...] leaves
                leaves = _expert_leaves(experts)
                E = int(leaves[0][1].shape[0])
                for n, x in leaves:
                    arrays[f"moe{j}.{n}"] = np.asarray(x)
                treedef = jax.tree.structure(jax.tree.map(lambda a: a[0], experts))
                layer_entries = [(treedef, [(f"moe{j}.{n}", e) for n, _ in leaves]) for e in range(E)]
                per = int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape[1:]) for _, x in leaves))
                layer_bytes = [per] * E
                dense_slots.append(False)
            entries.append(layer_entries)
            nbytes.append(layer_bytes)
            layer = dict(params["layers"][str(i)])
            layer["moe"] = {k: v for k, v in moe_p.items() if k != "experts"}
            resident["layers"][str(i)] = layer
        if tier == "host":
            # pinned host memory makes device transfers DMA; a CPU device's memory is host memory already
            pinned = None if device.platform == "cpu" else _memory(device, "pinned_host")
            put = (lambda a: jax.device_put(a, pinned)) if pinned is not None else np.ascontiguousarray
            host = {k: put(a) if k in single else [put(x) for x in a] for k, a in arrays.items()}
            read = lambda key, index: host[key] if index is None else host[key][index]  # noqa: E731
        else:
            if path is None:
                raise ValueError("tier 'disk' needs a path for the experts' safetensors file")
            read = _disk_reader(Path(path), arrays)
        shapes = {k: (a.shape, a.dtype) for k, a in arrays.items()}
        return cls(tier, entries, nbytes, dense_slots, shapes, read, device), resident

    def _shape(self, key, index):
        shape, _ = self._shapes[key]
        return shape if index is None else shape[1:]

    def _dtype(self, key):
        return self._shapes[key][1]


def _is_quantized(x) -> bool:
    return isinstance(x, QuantizedArray)


def _disk_reader(path: Path, arrays: dict):
    try:
        from safetensors import safe_open
        from safetensors.numpy import save_file
    except ImportError:
        raise ValueError("the disk tier reads safetensors files: install jmoe's interop extra "
                         "(pip install 'jmoe[interop]')") from None
    if not path.parent.is_dir():
        raise ValueError(f"expert store {path}: directory {path.parent} does not exist")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    handle = safe_open(str(path), framework="numpy")
    slices = {k: handle.get_slice(k) for k in arrays}
    return lambda key, index: slices[key][:] if index is None else slices[key][index]


# ----------------------------------------------------------------------------- one layer's cache
class SlotCache:
    """N device slots of one MoE layer and which expert each holds, kept by a replacement
    policy of `jmoe.infer.cachesim.CACHE_POLICIES` with the simulator's semantics: a
    request's experts are hits when cached at its start; misses are loaded in ascending id,
    each evicting the policy's victim (never an expert of the same request) when full."""

    def __init__(self, num_experts: int, size: int, policy: str = "lru", options: dict | None = None):
        if policy in OFFLINE_POLICIES:
            raise ValueError(f"cache policy {policy!r} needs the future; it is for jmoe cache-sim, not for running")
        cls = CACHE_POLICIES.get(policy)
        self.policy = cls(CACHE_POLICIES.options(policy).from_dict(dict(options or {}),
                                                                   owner=f"cache policy {policy!r} options"))
        self.policy.reset(num_experts, size, np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32))
        self.num_experts, self.size = num_experts, size
        self.slot_of: dict[int, int] = {}
        self.free = list(range(size - 1, -1, -1))
        self.pending: set[int] = set()
        self.t = 0
        self.requests = self.hits = self.loads = self.prefetch_loads = self.useful_prefetches = 0

    def _admit(self, e: int, protected, prefetch: bool) -> int:
        if not self.free:
            v = self.policy.evict(e, protected, self.t, prefetch)
            self.free.append(self.slot_of.pop(v))
            self.pending.discard(v)
        slot = self.free.pop()
        self.slot_of[e] = slot
        self.policy.load(e, self.t, prefetch)
        return slot

    def prefetch(self, experts) -> list[tuple[int, int]]:
        """Load the named experts not cached (at most N) before the next request -> [(expert, slot)]."""
        wanted = list(dict.fromkeys(int(e) for e in experts))[: self.size]
        held, loads = set(wanted), []
        for e in sorted(wanted):
            if e not in self.slot_of:
                loads.append((e, self._admit(e, held, True)))
                self.pending.add(e)
                self.prefetch_loads += 1
        return loads

    def request(self, needed: list[int], weights: list[float]) -> list[tuple[int, int]]:
        """The experts of one step (ascending ids, at most N): count hits, load misses ->
        [(expert, slot)] loads to perform."""
        if len(needed) > self.size:
            raise ValueError(f"a request of {len(needed)} experts exceeds the cache of {self.size} slots")
        if self.policy.observe is not None:
            self.policy.observe(needed, weights, self.t)
        loads = []
        self.requests += len(needed)
        for e in needed:
            if e in self.slot_of:
                self.hits += 1
                self.policy.hit(e, self.t)
                if e in self.pending:
                    self.useful_prefetches += 1
                    self.pending.remove(e)
            else:
                loads.append((e, self._admit(e, needed, False)))
                self.loads += 1
        self.t += 1
        return loads

    def clear(self) -> None:
        """Forget every cached expert (the counts stay): load on demand clears after each step."""
        self.slot_of.clear()
        self.free = list(range(self.size - 1, -1, -1))
        self.pending.clear()
        self.policy.reset(self.num_experts, self.size, np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32))

    def slot_map(self) -> np.ndarray:
        """[E] int32 slot of each expert, -1 when not cached."""
        m = np.full((self.num_experts,), -1, np.int32)
        for e, s in self.slot_of.items():
            m[e] = s
        return m


# ----------------------------------------------------------------------------- compiled pieces
@partial(jax.jit, donate_argnums=0)
def _write_slot(slots, expert, s):
    return jax.tree.map(lambda b, w: lax.dynamic_update_index_in_dim(b, w.astype(b.dtype), s, 0), slots, expert)


def _attend(cfg, mode, positions, layer_cache):
    """The attention of one layer over a fresh cache ("prefill") or the cache ("decode");
    returns attend(i, p, h) and a list receiving the layer's new cache entry."""
    entry = []

    def attend(i, p, h):
        if mode == "prefill":
            out, new = prefill_attention(p, h, positions, cfg)
            entry.append({k: write(layer_cache[k], v, positions) for k, v in new.items()})
        else:
            out, new = cached_attention(p, h, positions, layer_cache, cfg)
            entry.append(new)
        return out

    return attend, entry


# Compiled once per (model, mode, MoE config), not per layer: layers of the same shapes share them.
@partial(jax.jit, static_argnames=("cfg", "mode"))
def _dense_block(p, x, positions, layer_cache, *, cfg, mode):
    attend, entry = _attend(cfg, mode, positions, layer_cache)
    x, h = attention_block(p, x, 0, cfg, attend)
    return x + ffn(p["ffn"], h, cfg.activation).astype(x.dtype), entry[0]


@partial(jax.jit, static_argnames=("cfg", "moe", "next_moe", "mode"))
def _route_block(p, x, positions, layer_cache, valid, state, carry, next_router, next_state, *, cfg, moe, next_moe,
                 mode):
    """Attention, FFN norm and router of a MoE layer -> (x, h [T, d], routing, cache entry,
    the step's experts [T, k] (-1: unused, or a token that does not count: `valid` [B, n]
    False), their weights, the next MoE layer's gate guess [T, k] or None).

    The routing of tokens that do not count is masked off: they load and run no expert.
    """
    attend, entry = _attend(cfg, mode, positions, layer_cache)
    x, h = attention_block(p, x, 0, cfg, attend)
    moe = serving_moe(moe, x.shape[0] * x.shape[1])
    xt = flatten_tokens(h, moe)
    routing, _ = route(p["moe"]["router"], xt, moe, state=state, carry=carry)  # skipped experts are not loaded
    routing = routing.replace(mask=routing.mask & valid.reshape(-1, 1))
    r = ffn_routing(routing, moe)
    keep = r.mask & (r.expert_ids >= 0) & (r.expert_ids < moe.num_experts)
    ids = jnp.where(keep, r.expert_ids, -1).astype(jnp.int32)
    weights = jnp.where(keep, r.weights, 0.0).astype(jnp.float32)
    guess = None
    if next_moe is not None:
        guess = jnp.where(valid.reshape(-1, 1), gate_routing(next_router, h, next_moe, next_state, routing.carry), -1)
    return x, xt, routing, entry[0], ids, weights, guess


def _slot_dispatch(name: str, slot_map: jax.Array, in_group: jax.Array):
    """The registered dispatch `name` over slot-resident experts: expert ids mapped to slots,
    slots of experts outside the group masked off."""
    base = DISPATCHERS.get(name)

    def dispatch(slots, xt, routing, cfg):
        ids = routing.expert_ids
        safe = jnp.clip(ids, 0, slot_map.shape[0] - 1)
        use = routing.mask & (ids >= 0) & (ids < slot_map.shape[0]) & in_group[safe]
        return base(slots, xt, routing.replace(expert_ids=jnp.where(use, slot_map[safe], 0), mask=use), cfg)

    return dispatch


@partial(jax.jit, static_argnames=("moe",))
def _group_experts(slots, slot_map, in_group, xt, routing, *, moe):
    """The routed experts of one group of a layer's experts: y [T, d]."""
    moe = serving_moe(moe, xt.shape[0])
    y, _ = _slot_dispatch(moe.dispatch, slot_map, in_group)(slots, xt, ffn_routing(routing, moe), moe)
    return y


@partial(jax.jit, static_argnames=("moe",))
def _moe_block(p_moe, slots, slot_map, in_group, x, xt, routing, y_more, *, moe):
    """The rest of a MoE layer on its slots (plus `y_more`, other groups' outputs) -> x."""
    moe = serving_moe(moe, xt.shape[0])
    y, _ = layer_body({**p_moe, "experts": slots}, xt, moe, dispatch=_slot_dispatch(moe.dispatch, slot_map, in_group),
                      state=None, key=None, carry=None, balance_counts=None, seq_len=sequence_length(x.shape),
                      routing=routing)
    if y_more is not None:
        y = y + y_more.astype(y.dtype)
    return x + y.reshape(x.shape).astype(x.dtype)


_embed = jax.jit(embed, static_argnums=2)


@partial(jax.jit, static_argnames=("cfg",))
def _final_prefill(params, x, lengths, *, cfg):
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return unembed(params, last, cfg)


_final = jax.jit(unembed, static_argnums=2)


# ----------------------------------------------------------------------------- statistics
def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


@dataclasses.dataclass
class OffloadStats:
    """What the expert cache did over the steps run so far."""

    requests: int = 0
    hits: int = 0
    loads: int = 0
    prefetch_loads: int = 0
    useful_prefetches: int = 0
    bytes_loaded: int = 0
    tokens: int = 0
    decode_requests: int = 0
    decode_hits: int = 0
    decode_bytes_loaded: int = 0
    decode_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return _ratio(self.hits, self.requests)

    @property
    def decode_hit_rate(self) -> float:
        return _ratio(self.decode_hits, self.decode_requests)

    @property
    def bytes_per_token(self) -> float:
        return _ratio(self.bytes_loaded, self.tokens)

    @property
    def decode_bytes_per_token(self) -> float:
        return _ratio(self.decode_bytes_loaded, self.decode_tokens)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for k in ("hit_rate", "decode_hit_rate", "bytes_per_token", "decode_bytes_per_token"):
            v = getattr(self, k)
            out[k] = v if math.isfinite(v) else None
        return out


def slot_bytes(experts) -> int:
    """Bytes of one device slot of a layer's experts: one expert as the slots hold it
    (quantized, or as float where the layer mixes widths)."""
    if isinstance(experts, ExpertList):
        one = experts.experts[0]
        if len({jax.tree.structure(x) for x in experts.experts}) > 1:
            return int(sum(math.prod(q.shape) * np.dtype(q.dtype).itemsize
                           for q in jax.tree.leaves(one, is_leaf=_is_quantized)))
        return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(one)))
    return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape[1:]) for x in jax.tree.leaves(experts)))


def cache_size_for_memory(cfg: LMConfig, params: dict, memory_bytes: int) -> int:
    """Slots per MoE layer that fit `memory_bytes` of expert slots over all MoE layers (at most
    E; ValueError when fewer than top-k fit)."""
    layers = list(cfg.moe_layers)
    per_expert = sum(slot_bytes(params["layers"][str(i)]["moe"]["experts"]) for i in layers)
    n = int(memory_bytes // max(per_expert, 1))
    k = max(cfg.moe_for(i).top_k for i in layers)
    E = min(cfg.moe_for(i).num_experts for i in layers)
    if n < k:
        raise ValueError(f"--expert-memory {format_bytes(memory_bytes)} holds {n} expert slot(s) per MoE layer "
                         f"({format_bytes(per_expert)} per slot over {len(layers)} MoE layers); at least top-k = {k} "
                         f"are needed ({format_bytes(k * per_expert)})")
    return min(n, E)


_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "KIB": 2**10,
          "MIB": 2**20, "GIB": 2**30, "TB": 1e12, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1e9' -> bytes (ValueError naming the text)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 2GiB, 512MB, 1e9)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value < 1:
        raise ValueError(f"{text!r} must be at least 1 byte")
    return int(value)


def format_bytes(n: float) -> str:
    """Bytes for people: '1.50 GiB', '12.00 KiB', '100 B'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------- the model
class OffloadedLM:
    """A model whose routed experts live in an `ExpertStore`, with `cache_size` device slots
    per MoE layer. `prefill` and `extend` match `jmoe.infer.forward`'s (and return the step's
    routing); `stats` counts hits, loads and bytes.

    Args:
      cfg: the model's `LMConfig`.
      params: its parameters, experts included (they move to the store).
      state: its router state, if any.
      cache_size: N, expert slots per MoE layer (top-k <= N <= E).
      policy: an online policy of `CACHE_POLICIES` (lru, lfu, score, arc), or "none": load on
        demand, forget after every step (no cache; N slots used as buffers).
      prefetch: "none", "gate" (the next MoE layer's router on this layer's input and carry) or
        "learned" (a `LearnedPredictor`, lookahead 1; decoding steps only).
      predictor: the `LearnedPredictor` for prefetch "learned".
      tier: the store's tier, "host" or "disk".
      path: the safetensors file of tier "disk".
      policy_options: the policy's options (e.g. {"alpha": 0.3} for score).
    """

    def __init__(self, cfg: LMConfig, params: dict, state: dict | None = None, *, cache_size: int,
                 policy: str = "lru", prefetch: str = "gate", predictor: LearnedPredictor | None = None,
                 tier: str = "host", path: str | Path | None = None, policy_options: dict | None = None):
        layers = list(cfg.moe_layers)
        if not layers:
            raise ValueError("the model has no MoE layers: there are no experts to offload")
        if prefetch not in PREFETCH:
            raise ValueError(f"prefetch {prefetch!r} must be one of {', '.join(PREFETCH)}")
        if prefetch == "learned":
            if not isinstance(predictor, LearnedPredictor):
                raise ValueError("prefetch 'learned' needs a LearnedPredictor (train one on a routing trace)")
            if predictor.num_layers != len(layers) or predictor.lookahead != 1:
                raise ValueError(f"the predictor covers {predictor.num_layers} MoE layers with lookahead "
                                 f"{predictor.lookahead}; the model has {len(layers)} (lookahead 1 needed)")
        kept = sorted({cfg.moe_for(i).dispatch for i in layers
                       if getattr(DISPATCHERS.get(cfg.moe_for(i).dispatch), "keep_when_serving", False)})
        if kept:
            raise ValueError(f"offloading runs the reference experts; dispatch {kept[0]!r} computes them otherwise "
                             "and is not offloaded")
        ks = [cfg.moe_for(i).top_k for i in layers]
        Es = [cfg.moe_for(i).num_experts for i in layers]
        if isinstance(cache_size, bool) or not isinstance(cache_size, (int, np.integer)) or cache_size < max(ks):
            raise ValueError(f"cache_size={cache_size!r} must be an integer >= top-k ({max(ks)}): the experts of one "
                             "token must fit at once")
        if policy != "none":
            CACHE_POLICIES.get(policy)
        self.cfg, self.state = cfg, state or {}
        self.policy, self.prefetch, self.predictor = policy, prefetch, predictor
        self.policy_options = policy_options
        self.moe_layers = layers
        self.store, self.params = ExpertStore.build(cfg, params, tier=tier, path=path)
        self.sizes = [min(int(cache_size), E) for E in Es]
        self.caches = [SlotCache(E, n, "lru" if policy == "none" else policy, policy_options)
                       for E, n in zip(Es, self.sizes)]
        self.slots = []
        for j in range(len(layers)):
            proto = self.store.slot_prototype(j)
            self.slots.append(jax.tree.map(lambda a, n=self.sizes[j]: jnp.zeros((n,) + a.shape, a.dtype), proto))
        self.stats = OffloadStats()
        self._last_ids: np.ndarray | None = None  # [B, L, k] each row's previous token's experts

    @property
    def resident_bytes(self) -> int:
        """Bytes held on the device: resident parameters and the expert slots (not the KV cache)."""
        leaves = jax.tree.leaves(self.params) + jax.tree.leaves(self.slots)
        return int(sum(x.size * x.dtype.itemsize for x in leaves))

    def reset_cache(self) -> None:
        """Empty every layer's cache (the slots keep their bytes) and zero the statistics."""
        self.caches = [SlotCache(c.num_experts, c.size, "lru" if self.policy == "none" else self.policy,
                                 self.policy_options) for c in self.caches]
        self.stats = OffloadStats()

    # ------------------------------------------------------------------ loads
    def _load(self, j: int, loads) -> None:
        for e, s in loads:
            self.slots[j] = _write_slot(self.slots[j], self.store.fetch(j, e), jnp.int32(s))
        moved = sum(self.store.bytes_of(j, e) for e, _ in loads)
        self.stats.bytes_loaded += moved
        if self._decoding:
            self.stats.decode_bytes_loaded += moved

    def _run_experts(self, j, i, p_moe, x, xt, routing, ids, weights):
        """Load and run MoE layer j's experts for the step's ids [T, k] -> x."""
        cache = self.caches[j]
        used = ids[ids >= 0]
        per_expert = np.bincount(used, weights=weights[ids >= 0], minlength=cache.num_experts)
        needed = sorted(set(used.tolist()))
        cached_first = [e for e in needed if e in cache.slot_of] + [e for e in needed if e not in cache.slot_of]
        groups = [sorted(cached_first[a: a + cache.size]) for a in range(0, len(cached_first), cache.size)] or [[]]
        y_more = None
        for g, group in enumerate(groups):
            hits0, useful0 = cache.hits, cache.useful_prefetches
            loads = cache.request(group, [float(per_expert[e]) for e in group])
            self.stats.requests += len(group)
            self.stats.hits += cache.hits - hits0
            self.stats.loads += len(loads)
            self.stats.useful_prefetches += cache.useful_prefetches - useful0
            if self._decoding:
                self.stats.decode_requests += len(group)
                self.stats.decode_hits += cache.hits - hits0
            self._load(j, loads)
            slot_map = jnp.asarray(np.maximum(cache.slot_map(), 0))
            in_group = np.zeros((cache.num_experts,), bool)
            in_group[group] = True
            if g < len(groups) - 1:
                y = _group_experts(self.slots[j], slot_map, jnp.asarray(in_group), xt, routing,
                                   moe=self.cfg.moe_for(i))
                y_more = y if y_more is None else y_more + y
            else:
                x = _moe_block(p_moe, self.slots[j], slot_map, jnp.asarray(in_group), x, xt, routing, y_more,
                               moe=self.cfg.moe_for(i))
        if self.policy == "none":  # load on demand: nothing stays
            cache.clear()
        return x

    def _prefetch_next(self, j: int, guess: np.ndarray | None, ids_now: np.ndarray, rows: int) -> None:
        """Prefetch MoE layer j + 1's guessed experts (the learned predictor: decoding steps only,
        as it reads each row's previous token at every layer)."""
        if j + 1 >= len(self.moe_layers) or self.prefetch == "none" or self.policy == "none":
            return
        if self.prefetch == "learned" and not self._decoding:
            return
        if self.prefetch == "gate":
            guess_ids = guess
        else:
            cur = np.full((rows, len(self.moe_layers), self.predictor.top_k), -1, np.int32)
            k = min(ids_now.shape[-1], cur.shape[-1])
            for jj in range(j + 1):
                cur[:, jj, :k] = self._step_ids[jj][:, :k]
            prev = self._last_ids if self._last_ids is not None else np.full_like(cur, -1)
            guess_ids = self.predictor.predict(j + 1, cur, prev[:, :, : cur.shape[-1]])
        g = guess_ids[guess_ids >= 0]
        if not g.size:
            return
        counts = np.bincount(g, minlength=self.caches[j + 1].num_experts)
        order = [int(e) for e in np.argsort(-counts, kind="stable") if counts[e] > 0]
        loads = self.caches[j + 1].prefetch(order)
        self.stats.prefetch_loads += len(loads)
        self._load(j + 1, loads)

    # ------------------------------------------------------------------ steps
    def _layers(self, x, positions, cache_layers, valid, mode):
        cfg, entries, routing_out = self.cfg, [], {"expert_ids": [], "weights": [], "gate_ids": []}
        carry, j, B, n = None, 0, x.shape[0], x.shape[1]
        self._step_ids = []
        prev_guess = None
        for i in range(cfg.n_layers):
            p = self.params["layers"][str(i)]
            if not cfg.is_moe_layer(i):
                x, entry = _dense_block(p, x, positions, cache_layers[i], cfg=cfg, mode=mode)
                entries.append(entry)
                continue
            next_i = self.moe_layers[j + 1] if j + 1 < len(self.moe_layers) else None
            # the next MoE layer's router on this layer's input: the gate guess (prefetch, traces)
            nxt = None if next_i is None else self.params["layers"][str(next_i)]["moe"]["router"]
            x, xt, routing, entry, ids, weights, guess = _route_block(
                p, x, positions, cache_layers[i], valid, self.state.get(str(i)), carry, nxt,
                None if next_i is None else self.state.get(str(next_i)), cfg=cfg, moe=cfg.moe_for(i),
                next_moe=None if next_i is None else cfg.moe_for(next_i), mode=mode)
            entries.append(entry)
            ids_h, w_h = np.asarray(ids), np.asarray(weights)
            guess_h = None if guess is None else np.asarray(guess)
            self._step_ids.append(ids_h)
            x = self._run_experts(j, i, p["moe"], x, xt, routing, ids_h, w_h)
            self._prefetch_next(j, guess_h, ids_h, ids_h.shape[0])
            routing_out["expert_ids"].append(ids_h.reshape(B, n, -1))
            routing_out["weights"].append(w_h.reshape(B, n, -1))
            routing_out["gate_ids"].append(np.full(ids_h.shape, -1, np.int32).reshape(B, n, -1) if prev_guess is None
                                           else prev_guess.reshape(B, n, -1))
            prev_guess = guess_h
            carry = routing.carry
            j += 1
        if n == 1:
            self._last_ids = np.stack([a.reshape(B, -1) for a in self._step_ids], axis=1)
        return x, tuple(entries), {k: tuple(v) for k, v in routing_out.items()}

    def prefill(self, tokens: jax.Array, lengths: jax.Array, max_len: int, live: jax.Array | None = None) -> tuple:
        """As `jmoe.infer.forward.prefill(..., with_routing=True)`: (logits [B, V], cache, routing).
        live: [B] bool, the rows that count (default all); positions past a row's length and
        rows not live load and run no routed expert (their outputs are never read)."""
        self._decoding = False
        B, P = tokens.shape
        live = np.ones((B,), bool) if live is None else np.asarray(live, bool)
        valid = (np.arange(P)[None, :] < np.asarray(lengths)[:, None]) & live[:, None]
        positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
        fresh = init_cache(self.cfg, B, max_len)
        x, layers, routing = self._layers(_embed(self.params, tokens, self.cfg), positions, fresh.layers,
                                          jnp.asarray(valid), "prefill")
        self.stats.tokens += int(valid.sum())
        # the previous token of each row's first decoded token is its last prompt token
        L = len(self.moe_layers)
        last = np.asarray(lengths) - 1
        self._last_ids = np.stack([routing["expert_ids"][jj][np.arange(B), last] for jj in range(L)], axis=1)
        logits = _final_prefill(self.params, x, lengths, cfg=self.cfg)
        return logits, KVCache(layers=layers, lengths=lengths.astype(jnp.int32)), routing

    def extend(self, tokens: jax.Array, cache: KVCache, live: jax.Array | None = None) -> tuple:
        """As `jmoe.infer.forward.extend(..., with_routing=True)`: (logits [B, n, V], cache, routing).
        live: [B] bool, the rows that count (default all; others load and run no routed expert)."""
        self._decoding = tokens.shape[1] == 1
        B, n = tokens.shape
        live = np.ones((B,), bool) if live is None else np.asarray(live, bool)
        valid = np.broadcast_to(live[:, None], (B, n))
        positions = jnp.minimum(cache.lengths[:, None] + jnp.arange(n, dtype=jnp.int32), cache.max_len - 1)
        x, layers, routing = self._layers(_embed(self.params, tokens, self.cfg), positions, cache.layers,
                                          jnp.asarray(valid), "decode")
        self.stats.tokens += int(valid.sum())
        if self._decoding:
            self.stats.decode_tokens += int(live.sum())
        self._decoding = False
        return _final(self.params, x, self.cfg), KVCache(layers=layers, lengths=cache.lengths + n), routing


class OffloadedEngine(Engine):
    """`Engine` over an `OffloadedLM`: the same generation (buckets, sampling, stop ids, traces),
    with the experts offloaded. `offload_stats` counts the cache's hits and bytes.

    Args:
      cfg: the model's `LMConfig`.
      params: its parameters, experts included.
      state: its router state, if any.
      batch_size: most prompts decoded together.
      **offload: the `OffloadedLM` arguments (cache_size, policy, prefetch, predictor, tier,
        path, policy_options).
    """

    def __init__(self, cfg: LMConfig, params: dict, state: dict | None = None, *, batch_size: int = 32, **offload: Any):
        self.lm = OffloadedLM(cfg, params, state, **offload)
        super().__init__(cfg, self.lm.params, state, batch_size=batch_size)

    @property
    def offload_stats(self) -> OffloadStats:
        return self.lm.stats

    def _steps(self, B, P, S, sampling, with_routing=False):
        lm, cfg = self.lm, self.cfg

        first = jax.jit(partial(sample_after_prefill, cfg=cfg, sampling=sampling))
        then = jax.jit(partial(sample_after_decode, sampling=sampling))

        def pre(params, state, tokens, lengths, row_keys, live):
            logits, cache, routing = lm.prefill(tokens, lengths, S, live)
            tok, seen = first(logits, tokens, lengths, row_keys)
            return tok, cache, seen, logits, routing

        def dec(params, state, cache, tok, seen, row_keys, step, live):
            logits, cache, routing = lm.extend(tok[:, None], cache, live)
            nxt, seen = then(logits[:, 0], tok, seen, row_keys, step)
            return nxt, cache, seen, logits[:, 0], routing

        return pre, dec, 0.0


def time_model(stats: OffloadStats, compute_s_per_token: float, link_bytes_per_s: float) -> dict:
    """Seconds per decoded token if loads crossed a link of `link_bytes_per_s` and did not
    overlap the compute (load on demand) or overlapped it fully (perfect prefetch)."""
    load_s = stats.decode_bytes_per_token / link_bytes_per_s if stats.decode_tokens else float("nan")
    return {"load_s_per_token": load_s, "serial_s_per_token": compute_s_per_token + load_s,
            "overlapped_s_per_token": max(compute_s_per_token, load_s)}


LINKS = {"pcie4_x16": 32e9, "h200_host_link": 64e9}
"""Host-to-device bandwidth in bytes/s used by the time model: PCIe 4.0 x16 (about 32 GB/s
per direction in theory; ~25 GB/s achieved) and an H200's PCIe 5.0 x16 host link (64 GB/s
in theory)."""

