"""Pallas kernels for the dropless hot path (GPU: Triton lowering; TPU: Mosaic lowering).

`MoEConfig(dispatch="dropless", impl="pallas")` runs the layer as
permute_tokens -> gmm (gate, up) -> activation -> gmm (down) -> combine_tokens
(`qgmm` for quantized experts on GPU).
On CPU the kernels run in Pallas interpret mode: exact, and slow.

Modules, each importing only those before it: `metadata`, `tiling` (tile sizes and the
`TilingTable`), `gmm_gpu`, `gmm_tpu`, `qgmm_gpu` (built on `gmm_gpu`), `rows` (kernels), `ops` (the ops with custom VJPs),
`tuning` (autotuning, which times `ops.gmm`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.dispatch.pallas.ops import (
    combine_rows,
    combine_tokens,
    default_backend,
    default_interpret,
    gather_rows,
    gmm,
    permute_tokens,
    qgmm,
    tgmm,
)
from jmoe.dispatch.pallas.tiling import DEFAULT_TILINGS, TilingTable, heuristic_tiling, load_tilings, tiling_for
from jmoe.dispatch.pallas.tuning import autotune, time_tilings
from jmoe.dispatch.sorting import sort_slots
from jmoe.experts import ExpertList, ffn, stacked_experts
from jmoe.quant.qarray import QuantizedArray
from jmoe.registry import DROPLESS_IMPLS


@jax.tree_util.register_pytree_node_class
class WidthClasses:
    """One quantized weight of experts of several bit widths: `(first expert, QuantizedArray
    [E_c, ...])` per width, the experts of each width contiguous in the expert order."""

    def __init__(self, parts):
        self.parts = tuple(parts)

    def tree_flatten(self):
        return tuple(q for _, q in self.parts), tuple(off for off, _ in self.parts)

    @classmethod
    def tree_unflatten(cls, offsets, qs):
        return cls(zip(offsets, qs))


def width_classes(experts: ExpertList):
    """Experts of mixed bit widths, grouped by width for `qgmm`: (rank [E], params), rank[e] the
    position of expert e in the regrouped order and params {name: `WidthClasses`}; None when
    one stacked array can hold them (every weight is float or of one width). Under `jit` the
    stacking copies each width's codes once per call (bits/8 bytes per weight)."""
    def key(e):
        return tuple((w.bits, w.group_size) if isinstance(w, QuantizedArray) else None for w in
                     (experts.experts[e][n] for n in sorted(experts.experts[e])))

    keys = [key(e) for e in range(experts.num_experts)]
    distinct = sorted(set(keys), key=str)
    if len(distinct) == 1 or any(None in k for k in distinct):
        return None
    order = [e for k in distinct for e in range(len(keys)) if keys[e] == k]
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(len(order))
    firsts = np.cumsum([0] + [keys.count(k) for k in distinct])[:-1]
    params = {}
    for name in experts.experts[0]:
        parts = []
        for first, k in zip(firsts, distinct):
            ws = [experts.experts[e][name] for e in order if keys[e] == k]
            parts.append((int(first), jax.tree.map(lambda *leaves: jnp.stack(leaves), *ws)))
        params[name] = WidthClasses(parts)
    return jnp.asarray(rank), params


def grouped_ffn(params, xs, group_sizes, activation, dtype=None, *, tilings=DEFAULT_TILINGS, backend=None,
                interpret=None):
    """`ffn` with `gmm`. xs: [N, d] sorted by expert; group_sizes: [E]; params `[E, ...]` -> [N, d].

    Quantized expert weights (`jmoe.quant.QuantizedArray`, or `WidthClasses` for several bit
    widths) go to `qgmm` on GPU, which reads them as stored; the TPU kernels take float weights,
    so there they are dequantized first."""
    kw = dict(group_sizes=group_sizes, tilings=tilings, backend=backend, interpret=interpret)

    def matmul(x, w):
        if isinstance(w, WidthClasses):  # each width's call fills only its experts' rows
            return sum(qgmm(x, q, group_offset=first, **kw) for first, q in w.parts)
        return qgmm(x, w, **kw) if isinstance(w, QuantizedArray) else gmm(x, w, **kw)

    matmul.takes_quantized = (backend or default_backend()) == "gpu"
    return ffn(params, xs, activation, dtype, matmul=matmul)


@DROPLESS_IMPLS.register("pallas")
def pallas_dropless(expert_params, x, expert_ids, weights, mask, cfg, *, tilings=None):
    """permute -> grouped FFN -> combine with the Pallas kernels. x: [T, d]; expert_ids, weights,
    mask: [T, k] -> [T, d]. `tilings`: the grouped matmuls' `TilingTable` (default: the file of
    the layer's `tilings` option, or the built-in tiles). Experts of mixed bit widths (an
    `ExpertList`) run on GPU width by width, regrouped (`width_classes`)."""
    if tilings is None:
        path = getattr(cfg.dispatch_options, "tilings", None)
        tilings = DEFAULT_TILINGS if path is None else load_tilings(path)
    classes = None
    if isinstance(expert_params, ExpertList) and default_backend() == "gpu":
        classes = width_classes(expert_params)
    if classes is not None:
        rank, expert_params = classes
        expert_ids = rank[expert_ids]
        E = len(rank)
    else:
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
    "WidthClasses",
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
    "qgmm",
    "tgmm",
    "tiling_for",
    "time_tilings",
    "width_classes",
]
