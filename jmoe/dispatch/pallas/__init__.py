"""Pallas kernels for the dropless hot path (GPU: Triton lowering; TPU: Mosaic lowering).

`MoEConfig(dispatch="dropless", impl="pallas")` runs the layer as
permute_tokens -> gmm (gate, up) -> activation -> gmm (down) -> combine_tokens.
On CPU the kernels run in Pallas interpret mode: exact, and slow.

Modules, each importing only those before it: `metadata`, `tiling` (tile sizes and the
`TilingTable`), `gmm_gpu`, `gmm_tpu`, `rows` (kernels), `ops` (the ops with custom VJPs),
`tuning` (autotuning, which times `ops.gmm`).
"""

from functools import partial

import jax.numpy as jnp

from jmoe.dispatch.pallas.ops import (
    combine_rows,
    combine_tokens,
    default_backend,
    default_interpret,
    gather_rows,
    gmm,
    permute_tokens,
    tgmm,
)
from jmoe.dispatch.pallas.tiling import DEFAULT_TILINGS, TilingTable, heuristic_tiling, load_tilings, tiling_for
from jmoe.dispatch.pallas.tuning import autotune, time_tilings
from jmoe.dispatch.sorting import sort_slots
from jmoe.experts import ffn, stacked_experts
from jmoe.registry import DROPLESS_IMPLS


def grouped_ffn(params, xs, group_sizes, activation, dtype=None, *, tilings=DEFAULT_TILINGS, backend=None,
                interpret=None):
    """`ffn` with `gmm`. xs: [N, d] sorted by expert; group_sizes: [E]; params `[E, ...]` -> [N, d]."""
    matmul = partial(gmm, group_sizes=group_sizes, tilings=tilings, backend=backend, interpret=interpret)
    return ffn(params, xs, activation, dtype, matmul=matmul)


@DROPLESS_IMPLS.register("pallas")
def pallas_dropless(expert_params, x, expert_ids, weights, mask, cfg, *, tilings=None):
    """permute -> grouped FFN -> combine with the Pallas kernels. x: [T, d]; expert_ids, weights,
    mask: [T, k] -> [T, d]. `tilings`: the grouped matmuls' `TilingTable` (default: the file of
    the layer's `tilings` option, or the built-in tiles)."""
    if tilings is None:
        path = getattr(cfg.dispatch_options, "tilings", None)
        tilings = DEFAULT_TILINGS if path is None else load_tilings(path)
    expert_params = stacked_experts(expert_params)
    E = expert_params["w_up"].shape[0]
    order, group_sizes = sort_slots(expert_ids, mask, E)
    xs = permute_tokens(x, order, expert_ids.shape[1])
    ys = grouped_ffn(expert_params, xs, group_sizes, cfg.activation, cfg.dtype, tilings=tilings)
    y = combine_tokens(ys, order, jnp.where(mask, weights, 0.0))
    return y.astype(ys.dtype)


__all__ = [
    "DEFAULT_TILINGS",
    "TilingTable",
    "autotune",
    "combine_rows",
    "combine_tokens",
    "default_backend",
    "default_interpret",
    "gather_rows",
    "gmm",
    "grouped_ffn",
    "heuristic_tiling",
    "load_tilings",
    "pallas_dropless",
    "permute_tokens",
    "tgmm",
    "tiling_for",
    "time_tilings",
]
