"""Dropless dispatch: sort token-slots by expert, grouped matmul, unsort and combine.

Implementations (the `impl` option, `--set moe.dropless.impl=...`):
  "xla": the fused chunked loop of `jmoe.dispatch.chunked` (fast on CPU, O(T d) memory).
  "ragged_dot": permute -> `jax.lax.ragged_dot` grouped FFN -> unpermute + combine.
  "pallas": the same pipeline with jmoe's Pallas kernels (jmoe.dispatch.pallas).
  "auto": "xla" on CPU, "pallas" on GPU and TPU.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.dispatch.base import expert_fn_for
from jmoe.dispatch.chunked import chunked_expert_combine
from jmoe.dispatch.permute import permute, unpermute_combine
from jmoe.dispatch.sorting import sort_slots
from jmoe.experts import ffn, num_experts_of, stacked_experts
from jmoe.options import Options, option
from jmoe.registry import DISPATCHERS, DROPLESS_IMPLS


def resolve_impl(impl: str) -> str:
    """The concrete implementation name for `impl` on the current default backend."""
    if impl != "auto":
        DROPLESS_IMPLS.get(impl)
        return impl
    return "xla" if jax.default_backend() == "cpu" else "pallas"


@dataclasses.dataclass(frozen=True)
class DroplessOptions(Options):
    """impl: the grouped-matmul implementation ("auto" picks per backend, see `resolve_impl`).
    block_size: rows per chunk of the "xla" implementation.
    tilings: a JSON file of measured tile sizes for the "pallas" implementation (written by
      `jmoe.dispatch.pallas.TilingTable.save`, e.g. after `autotune`); None: the built-in ones."""

    impl: str = option("auto")
    block_size: int = option(512, ge=1)
    tilings: str | None = option(None)

    def validate(self, cfg) -> None:
        if self.impl != "auto" and self.impl not in DROPLESS_IMPLS:
            raise ValueError(
                f"MoEConfig.dropless.impl={self.impl!r} is unknown; known: auto, {', '.join(DROPLESS_IMPLS.names())}"
            )
        if self.tilings is not None:
            from jmoe.dispatch.pallas.tiling import load_tilings

            load_tilings(self.tilings)


@DROPLESS_IMPLS.register("xla")
def xla_dropless(expert_params, x, expert_ids, weights, mask, cfg):
    """Fused chunked loop. x: [T, d]; expert_ids, weights, mask: [T, k] -> [T, d]. Takes
    stacked expert params or an `ExpertList`."""
    order, group_sizes = sort_slots(expert_ids, mask, num_experts_of(expert_params))
    w = jnp.where(mask, weights, 0.0).reshape(-1)
    return chunked_expert_combine(
        x, w, order, group_sizes, expert_params, expert_fn_for(cfg), expert_ids.shape[1], cfg.dispatch_options.block_size
    )


def ragged_ffn(params, xs, group_sizes, activation, dtype=None):
    """`ffn` with `jax.lax.ragged_dot`. xs: [N, d] sorted by group; group_sizes: [E] -> [N, d]."""
    return ffn(params, xs, activation, dtype, matmul=partial(lax.ragged_dot, group_sizes=group_sizes))


@DROPLESS_IMPLS.register("ragged_dot")
def ragged_dot_dropless(expert_params, x, expert_ids, weights, mask, cfg):
    """permute -> ragged_dot FFN -> unpermute + combine. Shapes as `xla_dropless`."""
    expert_params = stacked_experts(expert_params)
    order, group_sizes = sort_slots(expert_ids, mask, num_experts_of(expert_params))
    xs = permute(x, order, expert_ids.shape[1])
    ys = ragged_ffn(expert_params, xs, group_sizes, cfg.activation, cfg.dtype)
    return unpermute_combine(ys, order, jnp.where(mask, weights, 0.0)).astype(ys.dtype)


def grouped_expert_apply(expert_params, rows, expert_ids, valid, cfg):
    """Each valid row through its expert (weight 1); invalid rows give 0.

    rows: [R, d]; expert_ids, valid: [R] -> [R, d]. Used where rows arrive already
    assigned to one expert each (e.g. after an expert-parallel all-to-all).
    """
    impl = DROPLESS_IMPLS.get(resolve_impl(cfg.dispatch_options.impl))
    ids = expert_ids[:, None]
    return impl(expert_params, rows, ids, valid[:, None].astype(jnp.float32), valid[:, None], cfg)


def dropless_dispatch(expert_params, x, routing, cfg):
    """No token-slot is dropped. x: [T, d] -> ([T, d], dropped=0). Expert params stacked or
    an `ExpertList` (which the "xla" implementation runs in place)."""
    impl = DROPLESS_IMPLS.get(resolve_impl(cfg.dispatch_options.impl))
    y = impl(expert_params, x, routing.expert_ids, routing.weights, routing.mask, cfg)
    return y, jnp.zeros((), jnp.float32)


dropless_dispatch.takes_expert_list = True
DISPATCHERS.add("dropless", dropless_dispatch, options=DroplessOptions)
