"""Fully sharded sparse data parallelism (FSSDP, Hecate: "Unlocking Efficient Sparse Model
Training via Fully Sharded Sparse Data Parallelism"): the experts come to the tokens.

Instead of expert parallelism's token all-to-alls, every device keeps its tokens (the mesh's
token axes are all data axes) and the expert weights, with their optimizer state, are sharded
whole experts at a time over every device (`FSSDP_RULES`: expert e on device e // (E / N)).
Each MoE layer materialises the experts on every device, then runs its own tokens through them
with the layer's dropless grouped matmul. With every expert (M = E, the default) that is a
plain all-gather of the shards, whose gradient is a reduce-scatter: each owner receives the
sum of its experts' gradients over the devices. With a budget of M < E experts per layer and
step (`ExpertParallel(..., impl="fssdp", fssdp_experts=M)`), the layer counts, over all
devices, the experts its tokens route to and materialises only those: a sparse all-gather,
each owner contributing its experts in use to an [M, ...] buffer that is summed over the
devices (a broadcast from each owner; the gradient goes back the same way), so the bytes
moved follow M, not E (twice an all-gather's bytes per expert: worth it below E / 2).

With M at least the number of experts in use (always with M = E) the layer equals the
single-device layer, outputs and gradients; with a smaller M, the first M experts in use (by
id) are materialised and the token-slots of the others are dropped and counted (the capacity of
the materialisation).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jmoe.dispatch.dropless import resolve_impl
from jmoe.parallel.rules import DEFAULT_RULES
from jmoe.registry import DROPLESS_IMPLS

# whole experts over every token axis of the mesh; the rest as expert parallelism shards it
FSSDP_RULES = (
    (r"(^|/)experts/w_(gate|up|down)$", P(("data", "fsdp", "expert"))),
    *DEFAULT_RULES,
)


@dataclasses.dataclass(frozen=True)
class SparseGather:
    """The FSSDP dispatch inside `shard_map` (see the module docstring).

    axes, sizes: the mesh axes the tokens and the experts are sharded over, and their sizes.
    max_experts: M, experts materialised per step (None: all of them).
    """

    axes: tuple[str, ...]
    sizes: tuple[int, ...]
    max_experts: int | None = None

    def __call__(self, expert_params, x, routing, cfg):
        """expert_params: this device's E / N experts; x: [T, d] its tokens -> (y [T, d], dropped)."""
        e_local = jax.tree.leaves(expert_params)[0].shape[0]
        N = math.prod(self.sizes)
        E = e_local * N
        M = E if self.max_experts is None else min(self.max_experts, E)
        me = 0
        for a, n in zip(self.axes, self.sizes):
            me = me * n + lax.axis_index(a)
        ids, mask = routing.expert_ids, routing.mask
        compute_cfg = cfg if cfg.dispatch == "dropless" else cfg.replace(dispatch="dropless")
        impl = DROPLESS_IMPLS.get(resolve_impl(compute_cfg.dispatch_options.impl))
        if M == E:  # every expert: a plain all-gather, whose gradient is a reduce-scatter
            experts = jax.tree.map(lambda w: lax.all_gather(w, self.axes, axis=0, tiled=True), expert_params)
            y = impl(experts, x, jnp.clip(ids, 0, E - 1), jnp.where(mask, routing.weights, 0.0), mask, compute_cfg)
            return y, jnp.zeros((), jnp.float32)
        local_counts = jnp.bincount(jnp.where(mask, ids, E).reshape(-1), length=E + 1)[:E]
        in_use = lax.psum(local_counts, self.axes) > 0  # [E], the same on every device
        chosen = jnp.argsort(~in_use, stable=True)[:M].astype(jnp.int32)  # experts in use first, by id
        slot_of = jnp.full((E,), -1, jnp.int32).at[chosen].set(jnp.arange(M, dtype=jnp.int32))
        slot_of = jnp.where(in_use, slot_of, -1)
        mine = (chosen // e_local) == me
        local = chosen % e_local

        def materialise(w):
            own = jnp.where(mine.reshape((M,) + (1,) * (w.ndim - 1)), jnp.take(w, local, axis=0), 0)
            return lax.psum(own, self.axes)

        experts = jax.tree.map(materialise, expert_params)
        sid = jnp.take(slot_of, jnp.clip(ids, 0, E - 1))
        keep = mask & (sid >= 0)
        y = impl(experts, x, jnp.maximum(sid, 0), jnp.where(keep, routing.weights, 0.0), keep, compute_cfg)
        return y, jnp.sum(mask & ~keep).astype(jnp.float32)

