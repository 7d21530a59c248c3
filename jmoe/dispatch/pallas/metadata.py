"""Group metadata for grouped matmul kernels (the megablox scheme).

Rows [M] are sorted by group. The row tiles of size tm are visited once per group that has
rows in them, so a tile shared by two groups is visited twice (each visit stores only its
own group's rows). Grid step t works on the pair (group_ids[t], m_tile_ids[t]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cdiv(a: int, b: int) -> int:
    """Ceiling division of integers: ceil(a / b)."""
    return -(-a // b)


def max_tiles(m: int, tm: int, num_groups: int) -> int:
    """Static upper bound on (group, tile) pairs: every group boundary can split one tile."""
    return cdiv(m, tm) + num_groups - 1


def group_metadata(group_sizes: jax.Array, m: int, tm: int, group_offset: int | jax.Array = 0,
                   num_local_groups: int | None = None):
    """(group, m-tile) pairs of the groups [group_offset, group_offset + num_local_groups).

    Args:
      group_sizes: [G] int32 rows per group (all groups, sorted order).
      m: rows of the (padded) lhs.
      tm: rows per tile.
      group_offset: first group this call computes (int or int32 scalar), for rhs shards.
      num_local_groups: groups held by the rhs (default: all).
    Returns:
      offsets: [G + 1] int32 first row of each group (and the end).
      group_ids: [max_tiles] int32 group of each grid step (global group index).
      m_tile_ids: [max_tiles] int32 row tile of each grid step.
      num_tiles: [1] int32 steps that do work; later steps are idle.
    """
    G = group_sizes.shape[0]
    local = G if num_local_groups is None else num_local_groups
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    gid = jnp.arange(G, dtype=jnp.int32)
    in_shard = (gid >= group_offset) & (gid < group_offset + local)
    first = starts // tm
    last = (ends - 1) // tm
    tiles = jnp.where((sizes > 0) & in_shard, last - first + 1, 0)
    bound = max_tiles(m, tm, G)
    group_ids = jnp.repeat(gid, tiles, total_repeat_length=bound)
    tile_start = jnp.cumsum(tiles) - tiles
    within = jnp.arange(bound, dtype=jnp.int32) - tile_start[group_ids]
    m_tile_ids = (first[group_ids] + within).astype(jnp.int32)
    num_tiles = jnp.sum(tiles).astype(jnp.int32)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    # idle steps point at the last real pair so their blocks are already resident
    last_real = jnp.maximum(num_tiles - 1, 0)
    idle = jnp.arange(bound) >= num_tiles
    group_ids = jnp.where(idle, group_ids[last_real], group_ids)
    m_tile_ids = jnp.where(idle, m_tile_ids[last_real], m_tile_ids)
    return offsets, group_ids, m_tile_ids, num_tiles[None]
