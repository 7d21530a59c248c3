"""Capacity dispatch (GShard / flaxformer): fixed-size expert buffers, overflow dropped.

Each expert holds C = ceil(capacity_factor * T * k / E) slots. Slots claim buffer places
in priority order: every token's first choice before any second choice (GShard's
"first-choice-first"), tokens in order within a choice. A slot that finds its expert
full is dropped: its weight is zeroed, so the token keeps only its other experts and the
residual connection around the layer. Deterministic.

The buffers `[E, C, d]` are built with index gathers (the dispatch/combine tensors of
GShard, stored as indices) and the experts run as one batched einsum.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jmoe.checks import check_int
from jmoe.experts import ffn
from jmoe.options import Options, option
from jmoe.registry import DISPATCHERS
from jmoe.dispatch.sorting import group_offsets

if TYPE_CHECKING:
    from jmoe.routing.base import Routing


@dataclasses.dataclass(frozen=True)
class CapacityOptions(Options):
    """capacity_factor: every expert holds C = ceil(capacity_factor * T * k / E) slots."""

    capacity_factor: float = option(1.25, gt=0.0)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * T * k / E), at least 1."""
    check_int(num_tokens, "num_tokens", minimum=0)
    check_int(top_k, "top_k")
    check_int(num_experts, "num_experts")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor!r} must be > 0")
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


@partial(jax.jit, static_argnums=(2, 3))
def capacity_assignment(expert_ids: jax.Array, mask: jax.Array, num_experts: int, capacity: int):
    """Buffer position of every slot under the first-choice-first priority rule.

    Args:
      expert_ids: [T, k] int.
      mask: [T, k] bool, slots that are used.
    Returns:
      position: [T, k] int32, the slot's place in its expert's buffer (its rank among the
        slots of that expert in priority order).
      keep: [T, k] bool, mask & (position < capacity).
    """
    T, k = expert_ids.shape
    key = jnp.where(mask, expert_ids, num_experts).T.reshape(-1).astype(jnp.int32)  # choice-major
    order = jnp.argsort(key, stable=True)
    counts = jnp.bincount(key, length=num_experts + 1)
    rank_sorted = jnp.arange(k * T, dtype=jnp.int32) - group_offsets(counts)[key[order]]
    rank = jnp.zeros((k * T,), jnp.int32).at[order].set(rank_sorted, unique_indices=True)
    position = rank.reshape(k, T).T
    return position, mask & (position < capacity)


def buffer_rows(group_ids: jax.Array, position: jax.Array, keep: jax.Array, num_groups: int, capacity: int):
    """Where every slot sits in `num_groups` buffers of `capacity` rows, and which slot fills each row.

    Args:
      group_ids: [T, k] the buffer of each slot.
      position: [T, k] its place in that buffer.
      keep: [T, k] whether it is kept.
      num_groups: number of buffers.
      capacity: rows per buffer.
    Returns:
      row: [T*k] int32 buffer row of each slot (num_groups * capacity for dropped slots).
      slot: [num_groups * capacity] int32 the slot in each buffer row (-1 for empty rows).
    """
    T, k = group_ids.shape
    G, C = num_groups, capacity
    row = jnp.where(keep, group_ids * C + position, G * C).reshape(-1).astype(jnp.int32)
    slot = jnp.full((G * C + 1,), -1, jnp.int32).at[row].set(jnp.arange(T * k, dtype=jnp.int32), mode="drop")[: G * C]
    return row, slot


def gather_buffer(x: jax.Array, slot: jax.Array, top_k: int) -> jax.Array:
    """Buffer rows from tokens: x: [T, d], slot: [R] (-1 empty) -> [R, d] (zeros where empty)."""
    return jnp.where((slot >= 0)[:, None], jnp.take(x, jnp.maximum(slot, 0) // top_k, axis=0), 0)


def combine_slots(per_slot: jax.Array, routing: "Routing", keep: jax.Array):
    """Weighted sum of each token's kept expert outputs.

    Args:
      per_slot: [T*k, d] the expert output of every slot (anything where not kept).
      routing: the `Routing` (weights [T, k], mask [T, k]).
      keep: [T, k] bool, slots that were computed.
    Returns:
      y: [T, d] float32 = sum_j keep[t, j] * weights[t, j] * per_slot[t*k + j];
      dropped: float32 count of used slots (mask True) that were not kept.
    """
    T, k = keep.shape
    w = jnp.where(keep, routing.weights, 0.0).reshape(-1).astype(jnp.float32)
    y = jnp.sum((per_slot.astype(jnp.float32) * w[:, None]).reshape(T, k, -1), axis=1)
    return y, jnp.sum(routing.mask & ~keep).astype(jnp.float32)


def capacity_dispatch(expert_params, x, routing, cfg):
    """x: [T, d] -> ([T, d], number of dropped slots)."""
    T, d = x.shape
    E, k = jax.tree.leaves(expert_params)[0].shape[0], routing.top_k
    C = expert_capacity(T, k, E, cfg.dispatch_options.capacity_factor)
    position, keep = capacity_assignment(routing.expert_ids, routing.mask, E, C)
    row, slot = buffer_rows(routing.expert_ids, position, keep, E, C)
    xb = gather_buffer(x, slot, k).reshape(E, C, d)
    yb = jax.vmap(lambda p, xe: ffn(p, xe, cfg.activation, cfg.dtype))(expert_params, xb)
    per_slot = jnp.take(yb.reshape(E * C, d), jnp.minimum(row, E * C - 1), axis=0)
    y, dropped = combine_slots(per_slot, routing, keep)
    return y.astype(yb.dtype), dropped


DISPATCHERS.add("capacity", capacity_dispatch, options=CapacityOptions)
