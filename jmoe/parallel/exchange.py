"""Token exchanges: dispatchers that move token-slots to experts on other devices.

Inside `shard_map`, a device holds a shard of the tokens and E / n of the experts (n devices
on the mesh's "expert" axis). An exchange is a dispatcher with the contract of every
dispatch, `(expert_params, x [T, d], routing, cfg) -> (y [T, d], dropped)`, where
`expert_params` are the device's local experts and `routing` names global expert ids:

  padded     `all_to_all` of fixed-size per-destination buffers of C rows. Runs everywhere,
             CPU included. Slots beyond C for a destination are dropped, first choices before
             second choices and then in token order (the capacity rule), and counted.
  ragged     sort slots by destination, exchange exact counts, `ragged_all_to_all` into a
             receive buffer of R rows. When a device would receive more than R rows, each
             sender's tail beyond the space left is dropped, senders in device order. On
             backends without the primitive (CPU) the same exchange runs through an
             all-gather emulation.
  allgather  gather every token of the expert group, apply the local experts, and
             reduce-scatter the partial outputs back; cheaper than all-to-all when k is large.

The layer's dispatch decides the buffer sizes, so there is one capacity factor:
  dispatch="dropless"  nothing is dropped: C = T k (all of a shard's slots may go to one
                       device), R = n T k; allgather computes every slot.
  dispatch="capacity"  cf = the capacity option: C = ceil(cf T k / n) per destination
                       device, R = ceil(cf T k); allgather applies the single-device
                       capacity rule (ceil(cf T_group k / E) slots per expert) to the gathered
                       tokens of the expert group, so with one data shard it equals the
                       single-device capacity dispatch exactly.
The received rows run through the dropless grouped matmul of the layer's `impl` option (or
its default). Any other dispatch cannot run on a mesh and is refused.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.dispatch.capacity import buffer_rows, capacity_assignment, combine_slots, expert_capacity, gather_buffer
from jmoe.dispatch.dropless import grouped_expert_apply, resolve_impl
from jmoe.dispatch.sorting import inverse_permutation
from jmoe.registry import DROPLESS_IMPLS

EXCHANGES = ("padded", "ragged", "allgather")
MESH_DISPATCHES = ("dropless", "capacity")


def ragged_supported(platform: str | None = None) -> bool:
    """Whether `jax.lax.ragged_all_to_all` runs on the platform (not on XLA:CPU)."""
    return (platform or jax.default_backend()) in ("gpu", "cuda", "rocm", "tpu")


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


def ep_assignment(expert_ids, mask, num_experts: int, n_ep: int, capacity: int):
    """The padded exchange's drop rule, per source device.

    expert_ids, mask: [T_local, k] of one device. Returns (destination [T, k], position in
    the destination buffer [T, k], keep [T, k]).
    """
    e_local = num_experts // n_ep
    dest = expert_ids // e_local
    pos, keep = capacity_assignment(dest, mask, n_ep, capacity)
    return dest, pos, keep


# ----------------------------------------------------------------------------- exchanges


@dataclasses.dataclass(frozen=True)
class Exchange:
    """A token exchange over the mesh axis "expert", as a dispatcher (see the module docstring).

    kind: "padded" | "ragged" | "allgather".
    n: devices on the expert axis.
    tensor_parallel: the local experts' hidden width is split over the axis "model"; their
      partial outputs are summed there.
    native_ragged: `ragged_all_to_all` runs on this backend (else it is emulated).
    """

    kind: str
    n: int
    tensor_parallel: bool = False
    native_ragged: bool = False

    def __post_init__(self):
        if self.kind not in EXCHANGES:
            raise ValueError(f"Exchange.kind={self.kind!r} is unknown; known: {', '.join(EXCHANGES)}")

    def __call__(self, expert_params, x, routing, cfg):
        """x: [T_local, d]; routing over global expert ids -> (y [T_local, d], dropped slots)."""
        if cfg.dispatch not in MESH_DISPATCHES:
            raise ValueError(
                f"MoEConfig.dispatch={cfg.dispatch!r} cannot run expert-parallel; use one of {', '.join(MESH_DISPATCHES)}"
            )
        compute_cfg = cfg if cfg.dispatch == "dropless" else cfg.replace(dispatch="dropless")
        e_local = jax.tree.leaves(expert_params)[0].shape[0]
        fn = {"padded": self._padded, "ragged": self._ragged, "allgather": self._allgather}[self.kind]
        return fn(expert_params, x, routing, cfg, compute_cfg, e_local)

    def _rows(self, expert_params, rows, local_e, e_local, compute_cfg):
        """Received rows through their local experts (ids >= e_local mark empty rows)."""
        out = grouped_expert_apply(expert_params, rows, jnp.minimum(local_e, e_local - 1), local_e < e_local, compute_cfg)
        return lax.psum(out, "model") if self.tensor_parallel else out

    def _padded(self, expert_params, x, routing, cfg, compute_cfg, e_local):
        T, d = x.shape
        k, n = routing.top_k, self.n
        if cfg.dispatch == "capacity":
            C = max(1, math.ceil(cfg.dispatch_options.capacity_factor * T * k / n))
        else:
            C = T * k
        dest, pos, keep = ep_assignment(routing.expert_ids, routing.mask, e_local * n, n, C)
        row, slot = buffer_rows(dest, pos, keep, n, C)
        local_e = jnp.where(slot >= 0, jnp.take((routing.expert_ids % e_local).reshape(-1), jnp.maximum(slot, 0)), e_local)
        send = gather_buffer(x, slot, k).reshape(n, C, d)
        recv = lax.all_to_all(send, "expert", 0, 0).reshape(n * C, d)
        recv_e = lax.all_to_all(local_e.reshape(n, C), "expert", 0, 0).reshape(-1)
        out = self._rows(expert_params, recv, recv_e, e_local, compute_cfg)
        back = lax.all_to_all(out.reshape(n, C, d), "expert", 0, 0).reshape(n * C, d)
        y, dropped = combine_slots(jnp.take(back, jnp.minimum(row, n * C - 1), axis=0), routing, keep)
        return y.astype(out.dtype), dropped

    def _ragged(self, expert_params, x, routing, cfg, compute_cfg, e_local):
        T, d = x.shape
        k, n = routing.top_k, self.n
        N = T * k
        if cfg.dispatch == "capacity":
            R = max(1, math.ceil(cfg.dispatch_options.capacity_factor * N))
        else:
            R = n * N
        me = lax.axis_index("expert")
        dest = routing.expert_ids // e_local
        sort_key = jnp.where(routing.mask, routing.expert_ids, e_local * n).reshape(-1)  # dest-major
        order = jnp.argsort(sort_key, stable=True).astype(jnp.int32)
        dest_or_none = jnp.where(routing.mask, dest, n).reshape(-1)
        send_counts = jnp.bincount(dest_or_none, length=n + 1)[:n].astype(jnp.int32)
        off = ragged_offsets(lax.all_gather(send_counts, "expert"), me, R)  # [n, n] send matrix
        a2a = partial(_ragged_all_to_all, axis_name="expert", native=self.native_ragged)
        fwd = (off["input_offsets"], off["send_sizes"], off["output_offsets"], off["recv_sizes"])
        recv_x = a2a(jnp.take(x, order // k, axis=0), jnp.zeros((R, d), x.dtype), *fwd)
        recv_e = a2a(jnp.take((routing.expert_ids % e_local).reshape(-1), order), jnp.full((R,), e_local, jnp.int32), *fwd)
        out = self._rows(expert_params, recv_x, recv_e, e_local, compute_cfg)
        back_args = (off["back_input_offsets"], off["back_send_sizes"], off["back_output_offsets"], off["back_recv_sizes"])
        back = a2a(out, jnp.zeros((N, d), out.dtype), *back_args)  # [N, d] in sorted order
        # a sorted row is kept if it lies within the accepted head of its destination block
        sorted_dest = jnp.take(dest_or_none, order)
        block_start = jnp.take(jnp.append(off["input_offsets"], 0), sorted_dest)
        accepted = jnp.take(jnp.append(off["accepted"], 0), sorted_dest)
        kept_sorted = (sorted_dest < n) & (jnp.arange(N, dtype=jnp.int32) - block_start < accepted)
        inv = inverse_permutation(order)
        keep = jnp.take(kept_sorted, inv).reshape(T, k)
        y, dropped = combine_slots(jnp.take(back, inv, axis=0), routing, keep)
        return y.astype(out.dtype), dropped

    def _allgather(self, expert_params, x, routing, cfg, compute_cfg, e_local):
        T = x.shape[0]
        k = routing.top_k
        me = lax.axis_index("expert")
        gather = partial(lax.all_gather, axis_name="expert", axis=0, tiled=True)
        xa, ids, mask = gather(x), gather(routing.expert_ids), gather(routing.mask)
        keep = mask
        if cfg.dispatch == "capacity":
            E = e_local * self.n
            C = expert_capacity(T * self.n, k, E, cfg.dispatch_options.capacity_factor)
            _, keep = capacity_assignment(ids, mask, E, C)
        w = gather(jnp.where(routing.mask, routing.weights, 0.0))
        mine = keep & (ids // e_local == me)
        impl = DROPLESS_IMPLS.get(resolve_impl(compute_cfg.dispatch_options.impl))
        y_all = impl(expert_params, xa, ids % e_local, w, mine, compute_cfg)
        if self.tensor_parallel:
            y_all = lax.psum(y_all, "model")
        y = lax.psum_scatter(y_all.astype(jnp.float32), "expert", scatter_dimension=0, tiled=True)
        keep_local = lax.dynamic_slice_in_dim(keep, me * T, T)
        dropped = jnp.sum(routing.mask & ~keep_local).astype(jnp.float32)
        return y.astype(y_all.dtype), dropped


def _ragged_all_to_all(*args, axis_name, native: bool):
    if native:
        return lax.ragged_all_to_all(*args, axis_name=axis_name)
    return ragged_all_to_all_emulated(*args, axis_name=axis_name)
