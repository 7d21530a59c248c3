"""Online dynamic expert skipping (MC-MoE's online dynamic pruning, Aaronhuang-778/MC-MoE
`wrapper.py`): a token skips the experts whose routing weight is small next to its top one.

A selected FFN slot i of a token is dropped when w_i < ratio * max_j w_j (the reference code's
rule for Mixtral, `p2 < beta * p1`, for any k), and the kept slots are rescaled so the token's
total FFN weight is unchanged (the reference renormalises the survivors to sum to one, which is
the same for routers whose weights sum to one). The top slot is never dropped; FLOP-free
experts (null, MoE++) are left as they are. Dropped slots leave the routing mask, so every
dispatch skips their computation and an offloaded model does not load them.

`ratio` is `MoEConfig.skip_ratio` (0 skips nothing). The share of FFN slots skipped is
`MoEAux.skipped_fraction`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jmoe.routing.base import Routing


def skip_low_weight(routing: Routing, ratio: float, num_ffn_choices: int) -> tuple[Routing, jnp.ndarray]:
    """(routing with low-weight FFN slots dropped, number of slots dropped).

    routing: a `Routing` over [T, k] slots. ratio: in [0, 1]; 0 returns the routing unchanged.
    """
    if not ratio:
        return routing, jnp.zeros((), jnp.float32)
    ffn = routing.ffn_mask(num_ffn_choices)
    w = jnp.where(ffn, routing.weights, 0.0)
    top = jnp.max(w, axis=-1, keepdims=True)
    drop = ffn & (w < ratio * top)
    kept = jnp.where(drop, 0.0, w)
    total, kept_total = jnp.sum(w, axis=-1, keepdims=True), jnp.sum(kept, axis=-1, keepdims=True)
    scale = jnp.where(kept_total > 0, total / jnp.where(kept_total > 0, kept_total, 1.0), 1.0)
    weights = jnp.where(ffn, kept * scale, routing.weights)
    return routing.replace(mask=routing.mask & ~drop, weights=weights.astype(routing.weights.dtype)), \
        jnp.sum(drop).astype(jnp.float32)
