"""Expert parallelism: the MoE layer under `shard_map` on a device mesh.

Experts are split over the mesh's "expert" axis (E / n_ep per device); tokens over the
token axes ("data", "fsdp", "expert"); expert parameters sharded on "fsdp" are gathered
where used, and on "model" run tensor-parallel (each device holds a slice of the hidden
width and the partial outputs are summed). Three ways to move token-slots to their experts:

  padded     `all_to_all` of fixed-size per-destination buffers of
             C = ceil(capacity_factor * T_local * k / n_ep) rows. Runs everywhere, CPU
             included. Slots beyond C for a destination are dropped, first choices before
             second choices and then in token order (the capacity rule), and counted.
  ragged     sort slots by destination, exchange exact counts, `ragged_all_to_all` into a
             receive buffer of ceil(capacity_factor * T_local * k) rows. Dropless unless a
             device receives more than that; then each sender's tail beyond the space left
             is dropped, senders in device order. On backends without the primitive (CPU)
             the same exchange runs through an all-gather emulation.
  allgather  gather every token of the expert group, apply the local experts, and
             reduce-scatter the partial outputs back: dropless, cheaper than all-to-all
             when k is large.

"auto" is ragged on GPU/TPU and padded on CPU. Balance losses and load statistics are
computed from counts and probabilities summed over all token shards, so the layer's
outputs, aux losses and gradients equal the single-device layer's when nothing is dropped.
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

from jmoe.dispatch.capacity import capacity_assignment
from jmoe.dispatch.dropless import grouped_expert_apply, resolve_impl
from jmoe.dispatch.sorting import inverse_permutation
from jmoe.experts import ffn
from jmoe.layer import MoEAux, moe_aux, route_and_compute, sequence_length
from jmoe.registry import DISPATCHERS, DROPLESS_IMPLS
from jmoe.parallel.mesh import axis_size, token_axes
from jmoe.parallel.rules import DEFAULT_RULES, partition_specs

EP_IMPLS = ("auto", "padded", "ragged", "allgather")


def ragged_supported(platform: str | None = None) -> bool:
    """Whether `jax.lax.ragged_all_to_all` runs on the platform (not on XLA:CPU)."""
    return (platform or jax.default_backend()) in ("gpu", "cuda", "rocm", "tpu")


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Run MoE layers expert-parallel on `mesh`; pass as `moe_layer(..., ep=ExpertParallel(mesh))`."""

    mesh: Mesh
    impl: str = "auto"
    capacity_factor: float = 2.0

    def __post_init__(self):
        if self.impl not in EP_IMPLS:
            raise ValueError(f"ExpertParallel.impl={self.impl!r} is unknown; known: {', '.join(EP_IMPLS)}")
        if not self.capacity_factor > 0:
            raise ValueError(f"ExpertParallel.capacity_factor={self.capacity_factor!r} must be > 0")

    def resolved_impl(self) -> str:
        if self.impl != "auto":
            return self.impl
        return "ragged" if ragged_supported(self.mesh.devices.flat[0].platform) else "padded"

    def apply(self, params, x, cfg, *, state=None, key=None, carry=None, balance_counts=None):
        return ep_moe_layer(params, x, cfg, self, state=state, key=key, carry=carry, balance_counts=balance_counts)


# ----------------------------------------------------------------------------- offsets


def exclusive_cumsum(a: jax.Array, axis: int = 0) -> jax.Array:
    """Cumulative sum along `axis` that excludes each element itself (0 first); `a`'s shape and dtype."""
    return jnp.cumsum(a, axis=axis) - a


def ragged_offsets(send_matrix: jax.Array, me: jax.Array, capacity: int) -> dict[str, jax.Array]:
    """The arguments of `ragged_all_to_all` for device `me`, and of the return trip.

    Args:
      send_matrix: [n, n] int, send_matrix[i, j] = rows device i wants to send to device j
        (every device holds the same matrix).
      me: this device's index along the axis.
      capacity: rows of every receive buffer.
    Returns a dict of [n] int32 arrays:
      accepted: accepted[j] rows of mine that device j takes (senders fill a receiver's
        buffer in device order; the tail that does not fit is dropped).
      input_offsets, send_sizes, output_offsets, recv_sizes: the forward exchange.
      back_input_offsets, back_send_sizes, back_output_offsets, back_recv_sizes: the return
        trip of the expert outputs to where their rows came from.
    """
    M = send_matrix.astype(jnp.int32)
    A = jnp.clip(capacity - exclusive_cumsum(M, 0), 0, M)  # accepted[i, j]
    start_at_receiver = exclusive_cumsum(A, 0)  # where sender i's block lands in j's buffer
    start_at_sender = exclusive_cumsum(M, 1)  # where sender i's block for j starts in i's buffer
    return {
        "accepted": A[me],
        "input_offsets": start_at_sender[me],
        "send_sizes": A[me],
        "output_offsets": start_at_receiver[me],
        "recv_sizes": A[:, me],
        "back_input_offsets": start_at_receiver[:, me],
        "back_send_sizes": A[:, me],
        "back_output_offsets": start_at_sender[:, me],
        "back_recv_sizes": A[me],
    }


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """`lax.ragged_all_to_all` semantics from `all_gather` and gathers (for backends without it)."""
    del recv_sizes
    me = lax.axis_index(axis_name)
    ops = lax.all_gather(operand, axis_name)  # [n, N, ...]
    in_off = lax.all_gather(input_offsets, axis_name)[:, me]
    sizes = lax.all_gather(send_sizes, axis_name)[:, me]
    out_off = lax.all_gather(output_offsets, axis_name)[:, me]
    rows = jnp.arange(output.shape[0])
    inside = (rows[None, :] >= out_off[:, None]) & (rows[None, :] < (out_off + sizes)[:, None])  # [n, R]
    src = jnp.argmax(inside, axis=0)
    src_row = jnp.clip(in_off[src] + rows - out_off[src], 0, operand.shape[0] - 1)
    vals = ops[src, src_row]
    has = jnp.any(inside, axis=0).reshape((-1,) + (1,) * (output.ndim - 1))
    return jnp.where(has, vals, output)


def _ragged_all_to_all(*args, axis_name, native: bool):
    if native:
        return lax.ragged_all_to_all(*args, axis_name=axis_name)
    return ragged_all_to_all_emulated(*args, axis_name=axis_name)


# ----------------------------------------------------------------------------- the layer


def ep_assignment(expert_ids, mask, num_experts: int, n_ep: int, capacity: int):
    """The padded path's drop rule, per source device.

    expert_ids, mask: [T_local, k] of one device. Returns (destination [T, k], position in
    the destination buffer [T, k], keep [T, k]).
    """
    e_local = num_experts // n_ep
    dest = expert_ids // e_local
    pos, keep = capacity_assignment(dest, mask, n_ep, capacity)
    return dest, pos, keep


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


def _padded(params, x, routing, cfg, ep, n, e_local, tp):
    T, d = x.shape
    k = routing.top_k
    C = max(1, math.ceil(ep.capacity_factor * T * k / n))
    dest, pos, keep = ep_assignment(routing.expert_ids, routing.mask, cfg.num_experts, n, C)
    local_e = routing.expert_ids % e_local
    buf = jnp.where(keep, dest * C + pos, n * C).reshape(-1)  # [T*k] buffer row of each slot
    token = jnp.repeat(jnp.arange(T, dtype=jnp.int32), k)
    buf_token = jnp.zeros((n * C + 1,), jnp.int32).at[buf].set(token, mode="drop")[: n * C]
    buf_expert = jnp.full((n * C + 1,), e_local, jnp.int32).at[buf].set(local_e.reshape(-1), mode="drop")[: n * C]
    filled = buf_expert < e_local
    send = jnp.where(filled[:, None], jnp.take(x, buf_token, axis=0), 0).reshape(n, C, d)
    recv = lax.all_to_all(send, "expert", 0, 0)
    recv_e = lax.all_to_all(buf_expert.reshape(n, C), "expert", 0, 0).reshape(-1)
    rows = grouped_expert_apply(params, recv.reshape(n * C, d), jnp.minimum(recv_e, e_local - 1), recv_e < e_local, cfg)
    if tp:
        rows = lax.psum(rows, "model")
    back = lax.all_to_all(rows.reshape(n, C, d), "expert", 0, 0).reshape(n * C, d)
    per_slot = jnp.take(back, jnp.minimum(buf, n * C - 1), axis=0).astype(jnp.float32)
    w = jnp.where(keep, routing.weights, 0.0).reshape(-1).astype(jnp.float32)
    y = jnp.sum((per_slot * w[:, None]).reshape(T, k, d), axis=1)
    dropped = jnp.sum(routing.mask & ~keep).astype(jnp.float32)
    return y.astype(rows.dtype), dropped


def _ragged(params, x, routing, cfg, ep, n, e_local, tp, native):
    T, d = x.shape
    k = routing.top_k
    N = T * k
    R = max(1, math.ceil(ep.capacity_factor * T * k))
    me = lax.axis_index("expert")
    dest = routing.expert_ids // e_local
    local_e = routing.expert_ids % e_local
    sort_key = jnp.where(routing.mask, routing.expert_ids, cfg.num_experts).reshape(-1)  # dest-major
    order = jnp.argsort(sort_key, stable=True).astype(jnp.int32)
    send_counts = jnp.bincount(jnp.where(routing.mask, dest, n).reshape(-1), length=n + 1)[:n].astype(jnp.int32)
    M = lax.all_gather(send_counts, "expert")  # [n, n]
    off = ragged_offsets(M, me, R)
    sorted_x = jnp.take(x, order // k, axis=0)
    sorted_e = jnp.take(local_e.reshape(-1), order)
    a2a = partial(_ragged_all_to_all, axis_name="expert", native=native)
    fwd = (off["input_offsets"], off["send_sizes"], off["output_offsets"], off["recv_sizes"])
    recv_x = a2a(sorted_x, jnp.zeros((R, d), x.dtype), *fwd)
    recv_e = a2a(sorted_e, jnp.full((R,), e_local, jnp.int32), *fwd)
    valid = recv_e < e_local
    rows = grouped_expert_apply(params, recv_x, jnp.minimum(recv_e, e_local - 1), valid, cfg)
    if tp:
        rows = lax.psum(rows, "model")
    back_args = (off["back_input_offsets"], off["back_send_sizes"], off["back_output_offsets"], off["back_recv_sizes"])
    back = a2a(rows, jnp.zeros((N, d), rows.dtype), *back_args)  # [N, d] in sorted order
    # a sorted row is kept if it lies within the accepted head of its destination block
    row = jnp.arange(N, dtype=jnp.int32)
    sorted_dest = jnp.take(jnp.where(routing.mask, dest, n).reshape(-1), order)
    block_start = jnp.take(jnp.append(off["input_offsets"], 0), sorted_dest)
    accepted = jnp.take(jnp.append(off["accepted"], 0), sorted_dest)
    kept_sorted = (sorted_dest < n) & (row - block_start < accepted)
    inv = inverse_permutation(order)
    per_slot = jnp.take(back, inv, axis=0).astype(jnp.float32)
    keep = jnp.take(kept_sorted, inv).reshape(T, k)
    w = jnp.where(keep, routing.weights, 0.0).reshape(-1).astype(jnp.float32)
    y = jnp.sum((per_slot * w[:, None]).reshape(T, k, d), axis=1)
    dropped = jnp.sum(routing.mask & ~keep).astype(jnp.float32)
    return y.astype(rows.dtype), dropped


def _allgather(params, x, routing, cfg, ep, n, e_local, tp):
    me = lax.axis_index("expert")
    xa = lax.all_gather(x, "expert", axis=0, tiled=True)
    ids = lax.all_gather(routing.expert_ids, "expert", axis=0, tiled=True)
    w = lax.all_gather(jnp.where(routing.mask, routing.weights, 0.0), "expert", axis=0, tiled=True)
    mask = lax.all_gather(routing.mask, "expert", axis=0, tiled=True)
    mine = mask & (ids // e_local == me)
    impl = DROPLESS_IMPLS.get(resolve_impl(cfg.impl))
    y_all = impl(params, xa, ids % e_local, w, mine, cfg)
    if tp:
        y_all = lax.psum(y_all, "model")
    y = lax.psum_scatter(y_all.astype(jnp.float32), "expert", scatter_dimension=0, tiled=True)
    return y.astype(y_all.dtype), jnp.zeros((), jnp.float32)


def ep_moe_layer(params, x, cfg, ep: ExpertParallel, *, state=None, key=None, carry=None, balance_counts=None):
    """`moe_layer` on `ep.mesh`. x: [..., d] (global); returns (y [..., d], MoEAux).

    The aux's routing arrays (and the carry) are per token, sharded like the tokens; its
    losses and loads are global.
    """
    mesh = ep.mesh
    n = axis_size(mesh, "expert")
    if cfg.num_experts % n:
        raise ValueError(f"num_experts={cfg.num_experts} is not divisible by the mesh's expert axis ({n})")
    if cfg.dispatch == "dense":
        raise ValueError("dispatch='dense' is the single-device reference; use 'dropless' or 'capacity' on a mesh")
    taxes = token_axes(mesh)
    shards = math.prod(axis_size(mesh, a) for a in taxes)
    lead = x.shape[:-1]
    seq_len = sequence_length(x.shape)
    xt = x.reshape(-1, cfg.d_model)
    if cfg.dtype is not None:
        xt = xt.astype(cfg.dtype)
    T = xt.shape[0]
    if T % shards:
        raise ValueError(f"{T} tokens do not split evenly over the {shards} token shards of mesh {dict(mesh.shape)}")
    if (T // shards) % seq_len and (cfg.balance_scope == "sequence" or cfg.balance_loss == "seq_aux"):
        raise ValueError(f"sequence-scoped balance losses need whole sequences per shard ({T // shards} tokens, seq_len {seq_len})")
    impl = ep.resolved_impl()
    e_local = cfg.num_experts // n
    pspecs = partition_specs(params, mesh, DEFAULT_RULES)
    tp = axis_size(mesh, "model") > 1 and all(
        _sharded_on(pspecs["experts"][name], "model") for name in pspecs["experts"]
    )
    tp_shared = "shared" in params and axis_size(mesh, "model") > 1 and _sharded_on(pspecs["shared"], "model")
    tok_spec = P(taxes or None)
    has_key = key is not None
    native = ragged_supported(mesh.devices.flat[0].platform)
    psum = (lambda v: lax.psum(v, taxes)) if taxes else (lambda v: v)

    def dispatch(experts, x, routing, cfg):
        if n == 1:
            return DISPATCHERS.get(cfg.dispatch)(experts, x, routing, cfg)
        if impl == "padded":
            return _padded(experts, x, routing, cfg, ep, n, e_local, tp)
        if impl == "ragged":
            return _ragged(experts, x, routing, cfg, ep, n, e_local, tp, native)
        return _allgather(experts, x, routing, cfg, ep, n, e_local, tp)

    def local(params, x, state, key, carry, balance_counts):
        experts = _gather_sharded_dims(params["experts"], pspecs["experts"], "fsdp")
        if not tp:
            experts = _gather_sharded_dims(experts, pspecs["experts"], "model")
        if has_key:
            idx = 0
            for a in taxes:
                idx = idx * axis_size(mesh, a) + lax.axis_index(a)
            key = jax.random.fold_in(key, idx)
        y, dropped, routing = route_and_compute(
            params, x, cfg, experts, state=state, key=key if has_key else None, carry=carry, dispatch=dispatch
        )
        if "shared" in params:
            shared = _gather_sharded_dims(params["shared"], pspecs["shared"], "fsdp")
            if not tp_shared:
                shared = _gather_sharded_dims(shared, pspecs["shared"], "model")
            ys = ffn(shared, x, cfg.activation, cfg.dtype)
            if tp_shared:
                ys = lax.psum(ys, "model")
            if "shared_gate" in params:
                ys = ys * jax.nn.sigmoid(x.astype(jnp.float32) @ params["shared_gate"]["w"].astype(jnp.float32)).astype(ys.dtype)
            y = y + ys.astype(y.dtype)
        aux = moe_aux(routing, dropped, cfg, seq_len=seq_len, reduce=psum, shards=shards, global_counts=balance_counts)
        return y, aux

    scalar = P()
    aux_specs = MoEAux(
        loss=scalar, balance_loss=scalar, z_loss=scalar, load=scalar, tokens_per_expert=scalar,
        dropped_fraction=scalar, router_entropy=scalar, experts_per_token=scalar, zero_compute_fraction=scalar,
        routing=tok_spec, num_ffn_experts=cfg.num_routed,
    )
    key_arg = key if has_key else jnp.zeros((), jnp.uint32)
    # check_vma=False: the dropless loop's lax.switch mixes device-invariant (empty chunk)
    # and device-varying branches; gradients are checked against the single-device layer.
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(pspecs, tok_spec, jax.tree.map(lambda _: P(), state), P(), tok_spec, P()),
        out_specs=(tok_spec, aux_specs),
        check_vma=False,
    )
    y, aux = fn(params, xt, state, key_arg, carry, balance_counts)
    return y.reshape(lead + (cfg.d_model,)), aux
