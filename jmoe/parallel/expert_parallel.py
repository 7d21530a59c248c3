"""Expert parallelism: the MoE layer under `shard_map` on a device mesh.

Experts are split over the mesh's "expert" axis (E / n_ep per device); tokens over the
token axes ("data", "fsdp", "expert"); expert parameters sharded on "fsdp" are gathered
where used, and on "model" run tensor-parallel (each device holds a slice of the hidden
width and the partial outputs are summed). Each token shard runs the same layer body as
the single-device layer (`jmoe.layer.layer_body`), with a token exchange
(`jmoe.parallel.exchange`) as its dispatch: "padded", "ragged" or "allgather"; "auto" is
ragged on GPU/TPU and padded on CPU. The layer's `dispatch` ("dropless" or "capacity")
decides whether the exchange may drop token-slots and how many.

Balance losses and load statistics are computed from counts and probabilities summed over
all token shards, so the layer's outputs, aux losses and gradients equal the single-device
layer's when nothing is dropped.

Two variations keep that equality: an expert placement (`slots`, `jmoe.parallel.placement`)
puts experts, and copies of hot ones, in the slots of its choice, each token going to a copy of
its expert; and impl="fssdp" (`jmoe.parallel.fssdp`) exchanges no tokens, materialising the
experts in use where the tokens are.

A placement's experts come in one of two layouts. Stored per expert ([E, ...], the default), the
layer gathers each device's slots from them every step, and their gradients go back the same
way. Stored in their slots (`experts_in_slots=True`: [S, ...] in slot order, a replicated
expert's copies equal), each device holds its slots already and nothing but tokens moves; the
gradients of a replicated expert's copies are summed between the copies (one all-reduce of the
replicated experts' rows), so every copy receives the expert's whole gradient and copies stay
equal under any optimizer that updates element-wise.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jmoe.layer import MoEAux, flatten_tokens, layer_body, sequence_length
from jmoe.parallel.exchange import (  # noqa: F401  (re-exported)
    EXCHANGES,
    MESH_DISPATCHES,
    Exchange,
    ep_assignment,
    exclusive_cumsum,
    ragged_all_to_all_emulated,
    ragged_offsets,
    ragged_supported,
)
from jmoe.parallel.fssdp import FSSDP_RULES, SparseGather
from jmoe.parallel.mesh import axis_size, token_axes
from jmoe.parallel.rules import DEFAULT_RULES, partition_specs
from jmoe.registry import BALANCE_LOSSES, DISPATCHERS

EP_IMPLS = ("auto",) + EXCHANGES + ("fssdp",)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Run MoE layers expert-parallel on `mesh`; pass as `moe_layer(..., ep=ExpertParallel(mesh))`.

    impl: the token exchange, "auto" | "padded" | "ragged" | "allgather"; or "fssdp": no
      exchange, the experts sharded over every device come to the tokens instead
      (`jmoe.parallel.fssdp`), at most `fssdp_experts` of them per layer and step (None: all).
    experts_in_slots: under an expert placement, the expert weights are stored in their slots
      ([S, ...], slot order) rather than per expert ([E, ...]); see the module docstring.
    """

    mesh: Mesh
    impl: str = "auto"
    fssdp_experts: int | None = None
    experts_in_slots: bool = False

    def __post_init__(self):
        if self.impl not in EP_IMPLS:
            raise ValueError(f"ExpertParallel.impl={self.impl!r} is unknown; known: {', '.join(EP_IMPLS)}")
        if self.fssdp_experts is not None and (self.impl != "fssdp" or self.fssdp_experts < 1):
            raise ValueError(f"ExpertParallel.fssdp_experts={self.fssdp_experts!r} needs impl='fssdp' and a value >= 1")
        if self.experts_in_slots and (self.impl == "fssdp" or axis_size(self.mesh, "expert") < 2):
            raise ValueError("ExpertParallel.experts_in_slots needs an expert placement's layout: an expert axis of "
                             f"2 or more devices and a token exchange (mesh {dict(self.mesh.shape)}, impl {self.impl!r})")

    def resolved_impl(self) -> str:
        if self.impl != "auto":
            return self.impl
        return "ragged" if ragged_supported(self.platform) else "padded"

    @property
    def platform(self) -> str:
        return self.mesh.devices.flat[0].platform

    def exchange(self, tensor_parallel: bool = False) -> Exchange:
        """The dispatcher that moves token-slots over this mesh's expert axis."""
        return Exchange(self.resolved_impl(), axis_size(self.mesh, "expert"), tensor_parallel,
                        ragged_supported(self.platform))

    def apply(self, params, x, cfg, *, state=None, key=None, carry=None, balance_counts=None, slots=None):
        return ep_moe_layer(params, x, cfg, self, state=state, key=key, carry=carry, balance_counts=balance_counts,
                            slots=slots)


def physical_ids(slots: jax.Array, expert_ids: jax.Array, num_experts: int, first_token) -> jax.Array:
    """The slot each token-slot's expert runs in (`jmoe.parallel.placement`).

    slots: [S] int, the expert of each slot (every one of the `num_experts` at least once);
    expert_ids: [T, k] experts of T tokens; first_token: the index of row 0 over all token
    shards. Expert e with r copies sends token t to its copy t mod r (copies in slot order), so
    a replicated expert's tokens split evenly between its copies. Returns [T, k] slot ids.
    """
    count = jnp.maximum(jnp.bincount(slots, length=num_experts), 1)  # [E] copies
    by_expert = jnp.argsort(slots, stable=True).astype(jnp.int32)  # slots grouped by expert
    first_copy = jnp.cumsum(count) - count  # [E] where each expert's group starts
    e = jnp.clip(expert_ids, 0, num_experts - 1)
    t = first_token + jnp.arange(expert_ids.shape[0], dtype=jnp.int32)[:, None]
    return jnp.take(by_expert, first_copy[e] + t % count[e])


@dataclasses.dataclass(frozen=True)
class PlacedExchange:
    """A token exchange over the slots of a placement: each token-slot goes to a copy of its
    expert (`physical_ids`), then `exchange` moves it to the device of that slot. The expert
    weights it is given are the device's slots."""

    exchange: Any
    slots: jax.Array
    num_experts: int
    first_token: Any

    def __call__(self, expert_params, x, routing, cfg):
        ids = physical_ids(self.slots, routing.expert_ids, self.num_experts, self.first_token)
        return self.exchange(expert_params, x, routing.replace(expert_ids=ids), cfg)


def placed_experts(experts, slots: jax.Array):
    """The expert weights in their slots: every leaf [E, ...] -> [S, ...] (copies repeated).
    Gradients flow back to the experts (summed over copies), so a placement changes no result."""
    return jax.tree.map(lambda w: jnp.take(w, slots, axis=0), experts)


def _local_slots(experts, slots: jax.Array, n: int):
    """Inside `shard_map`: this expert device's S / n slots of the (gathered) experts [E, ...].
    The gather is an all-gather of the expert shards, so their gradients go back to their owners
    as a reduce-scatter."""
    per = slots.shape[0] // n
    mine = lax.dynamic_slice_in_dim(slots, lax.axis_index("expert") * per, per)
    return placed_experts(experts, mine)


def tied_copies(local, slots: jax.Array, num_experts: int, n: int):
    """Inside `shard_map`, of experts stored in their slots: this device's slots `local` (every
    leaf [S / n, ...]) unchanged, with a gradient that sums the copies of each replicated
    expert, so that each copy receives its expert's whole gradient.

    slots: [S] the expert of each slot. Only the replicated experts' rows move: their slots'
    gradients are added into an [S - E, ...] buffer (an expert with r copies takes r - 1 of the
    redundant slots, so its rows fit) that is summed over the "expert" axis.
    """
    return _tied(local, slots, num_experts, n)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _tied(local, slots, num_experts, n):
    return local


def _tied_fwd(local, slots, num_experts, n):
    return local, slots


def _tied_bwd(num_experts, n, slots, ct):
    R = slots.shape[0] - num_experts
    if R == 0:  # a permutation: no copies to tie
        return ct, None
    per = slots.shape[0] // n
    count = jnp.bincount(slots, length=num_experts)
    replicated = count > 1
    row = jnp.cumsum(replicated) - 1  # [E] the buffer row of each replicated expert
    mine = lax.dynamic_slice_in_dim(slots, lax.axis_index("expert") * per, per)  # [S / n] this device's experts
    is_copy = replicated[mine]
    r = jnp.where(is_copy, row[mine], R)  # R: out of the buffer, dropped

    def tie(g):
        buf = lax.psum(jnp.zeros((R,) + g.shape[1:], g.dtype).at[r].add(g, mode="drop"), "expert")
        summed = jnp.take(buf, jnp.minimum(r, R - 1), axis=0)
        return jnp.where(is_copy.reshape((per,) + (1,) * (g.ndim - 1)), summed, g)

    return jax.tree.map(tie, ct), None


_tied.defvjp(_tied_fwd, _tied_bwd)


def _check_slots(slots, experts, n: int, in_slots: bool, num_experts: int) -> int:
    """The number of experts (the weights' rows, or `num_experts` when they are stored in their
    slots: `moe_layer` checked that they have a row per slot); ValueErrors for slots that cannot
    hold them on `n` devices (found at trace time, before any computation)."""
    from jmoe.experts import ExpertList

    if isinstance(experts, ExpertList):
        raise ValueError("an expert placement needs experts of one shape (stacked weights), not an ExpertList")
    rows = jax.tree.leaves(experts)[0].shape[0]
    E = num_experts if in_slots else rows
    if slots.ndim != 1 or not jnp.issubdtype(slots.dtype, jnp.integer):
        raise ValueError(f"placement slots must be a 1-D integer array, got shape {slots.shape} dtype {slots.dtype}")
    if slots.shape[0] < E or slots.shape[0] % n:
        raise ValueError(f"a placement of {slots.shape[0]} slots cannot hold the layer's {E} experts on the mesh's "
                         f"{n} expert devices (needs >= {E} slots, a multiple of {n})")
    return E


def _gather_sharded_dims(tree, specs, axis: str):
    """all_gather every dimension sharded on `axis` (FSDP-style use of sharded parameters)."""

    def gather(x, spec):
        for dim, entry in enumerate(spec):
            names = entry if isinstance(entry, tuple) else (entry,)
            if axis in names:
                x = lax.all_gather(x, axis, axis=dim, tiled=True)
        return x

    return jax.tree.map(gather, tree, specs, is_leaf=lambda s: isinstance(s, P))


def _sharded_on(specs, axis: str) -> bool:
    for spec in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)):
        for entry in spec:
            if axis in (entry if isinstance(entry, tuple) else (entry,)):
                return True
    return False


def _check_fssdp(params, cfg, mesh, taxes, slots) -> None:
    N = math.prod(axis_size(mesh, a) for a in taxes)
    if slots is not None:
        raise ValueError("an expert placement places experts for expert parallelism; FSSDP shards every expert "
                         "over every device instead (use one or the other)")
    if axis_size(mesh, "model") > 1:
        raise ValueError(f"FSSDP runs on data axes only; mesh {dict(mesh.shape)} has a model axis")
    E = jax.tree.leaves(params["experts"])[0].shape[0]
    if E % N:
        raise ValueError(f"FSSDP shards whole experts over the mesh's {N} devices: {E} experts do not split evenly")
    if cfg.dispatch != "dropless":
        raise ValueError(f"MoEConfig.dispatch={cfg.dispatch!r} cannot run under FSSDP, which is dropless")


def _check(cfg, mesh, n, T, shards, seq_len, placed=False):
    if cfg.num_experts % n and not placed:
        raise ValueError(f"num_experts={cfg.num_experts} is not divisible by the mesh's expert axis ({n})")
    if n > 1 and cfg.dispatch not in MESH_DISPATCHES:
        raise ValueError(
            f"MoEConfig.dispatch={cfg.dispatch!r} cannot run expert-parallel on mesh {dict(mesh.shape)}; "
            f"use one of {', '.join(MESH_DISPATCHES)}"
        )
    if T % shards:
        raise ValueError(f"{T} tokens do not split evenly over the {shards} token shards of mesh {dict(mesh.shape)}")
    if (T // shards) % seq_len and BALANCE_LOSSES.get(cfg.balance_loss).scope_for(cfg) == "sequence":
        raise ValueError(f"sequence-scoped balance losses need whole sequences per shard ({T // shards} tokens, seq_len {seq_len})")


def aux_specs(token_spec: P, num_ffn_choices: int) -> MoEAux:
    """Partition specs of a `MoEAux`: scalars and per-choice statistics are replicated, the
    routing is sharded like the tokens."""
    fields = {f.name: P() for f in dataclasses.fields(MoEAux) if f.name not in ("routing", "num_ffn_choices")}
    return MoEAux(**fields, routing=token_spec, num_ffn_choices=num_ffn_choices)


def ep_moe_layer(params, x, cfg, ep: ExpertParallel, *, state=None, key=None, carry=None, balance_counts=None,
                 slots=None):
    """`moe_layer` on `ep.mesh`. x: [..., d] (global); returns (y [..., d], MoEAux).

    The aux's routing arrays (and the carry) are per token, sharded like the tokens; its
    losses and loads are global. slots: [S] the expert of each slot of an expert placement
    (`jmoe.parallel.placement`; slot j on device j // (S / n)), or None for the default layout
    (expert e on device e // (E / n)). The result does not depend on the placement.
    """
    mesh = ep.mesh
    n = axis_size(mesh, "expert")
    taxes = token_axes(mesh)
    shards = math.prod(axis_size(mesh, a) for a in taxes)
    seq_len = sequence_length(x.shape)
    xt = flatten_tokens(x, cfg)
    num_experts = None
    in_slots = ep.experts_in_slots
    if in_slots and slots is None:
        raise ValueError("ExpertParallel.experts_in_slots: the layer needs its placement (slots=...)")
    if n == 1:  # one expert device: every layout is the same
        slots = None
    if slots is not None:
        slots = jnp.asarray(slots)
        num_experts = _check_slots(slots, params["experts"], n, in_slots, cfg.num_experts)
    fssdp = ep.impl == "fssdp"
    if fssdp:
        _check_fssdp(params, cfg, mesh, taxes, slots)
    _check(cfg, mesh, 1 if fssdp else n, xt.shape[0], shards, seq_len, placed=slots is not None)
    pspecs = partition_specs(params, mesh, FSSDP_RULES if fssdp else DEFAULT_RULES)
    model_axis = axis_size(mesh, "model") > 1
    tp = not fssdp and model_axis and all(_sharded_on(pspecs["experts"][name], "model") for name in pspecs["experts"])
    tp_shared = "shared" in params and model_axis and _sharded_on(pspecs["shared"], "model")
    if fssdp:
        dispatch = SparseGather(taxes, tuple(axis_size(mesh, a) for a in taxes), ep.fssdp_experts)
    else:
        dispatch = ep.exchange(tp) if n > 1 else None
    tok_spec = P(taxes or None)
    has_key = key is not None
    psum = (lambda v: lax.psum(v, taxes)) if taxes else (lambda v: v)

    def gathered(params, slots):
        """The layer's parameters as the body uses them: FSDP shards gathered, tensor-parallel
        slices kept only where the computation is tensor-parallel, and under a placement this
        device's slots of the experts."""
        out = dict(params)
        if in_slots:  # this device's slots already
            out["experts"] = tied_copies(params["experts"], slots, num_experts, n)
        for name, is_tp in (("experts", tp), ("shared", tp_shared)):
            if name == "experts" and fssdp:  # materialised by the dispatch
                continue
            if name in params:
                tree = _gather_sharded_dims(out[name], pspecs[name], "fsdp")
                out[name] = tree if is_tp else _gather_sharded_dims(tree, pspecs[name], "model")
        if slots is not None and not in_slots:
            out["experts"] = _local_slots(_gather_sharded_dims(out["experts"], pspecs["experts"], "expert"), slots, n)
        return out

    def local(params, xt, state, key, carry, balance_counts, slots):
        idx = 0  # this token shard's index
        for a in taxes:
            idx = idx * axis_size(mesh, a) + lax.axis_index(a)
        if has_key:  # a different jitter per token shard
            key = jax.random.fold_in(key, idx)
        dispatch_fn = dispatch or DISPATCHERS.get(cfg.dispatch)
        if slots is not None:
            dispatch_fn = PlacedExchange(dispatch_fn, slots, num_experts, idx * xt.shape[0])
        return layer_body(
            gathered(params, slots), xt, cfg, dispatch=dispatch_fn, state=state,
            key=key if has_key else None, carry=carry, balance_counts=balance_counts, seq_len=seq_len,
            reduce=psum, shards=shards, partial_sum=(lambda v: lax.psum(v, "model")) if tp_shared else (lambda v: v),
        )

    key_arg = key if has_key else jnp.zeros((), jnp.uint32)
    # check_vma=False: the dropless loop's lax.switch mixes device-invariant (empty chunk)
    # and device-varying branches; gradients are checked against the single-device layer.
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(pspecs, tok_spec, jax.tree.map(lambda _: P(), state), P(), tok_spec, P(), P()),
        out_specs=(tok_spec, aux_specs(tok_spec, cfg.num_ffn_choices)),
        check_vma=False,
    )
    y, aux = fn(params, xt, state, key_arg, carry, balance_counts, slots)
    return y.reshape(x.shape[:-1] + (cfg.d_model,)), aux
