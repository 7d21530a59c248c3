"""Merging as pytree transformations.

Model merging: `jmoe.merge.<method>(base, models, **params) -> tree` for every method of the
table `MERGE_METHODS` (`MERGE_METHODS.names()`; e.g. linear, slerp, task_arithmetic, ties,
dare_ties, della, model_stock, fisher, regmean, pcb, consensus, layer_swap). Calling one checks
its parameters against the table, then runs the function. A new method is one function plus
one registration (`merge_method` / `register_merge_method`, see `jmoe.merge.registry`).
Methods that learn from unlabeled inputs of the tasks (in memory, with an objective such as
`prediction_entropy`): adamerging, concrete. Helpers: `map_merge` and `task_vector_merge` (the
shared pipeline, see `jmoe.merge.methods`),
`global_magnitude_thresholds`, `tall_masks`, `diagonal_fisher`, `lm_grams`; `jmoe.merge.tree`
has filters and per-layer parameters. Methods whose result is another architecture are
functions of the models' configuration and data: `wemoe` (FFNs upscaled into a routed mixture
of task vectors) and `twin_merging` (a shared merge plus each fine-tune's low-rank exclusive
knowledge, mixed by routers); `jmoe.merge.routed` has what they share. `pleas` merges two
models from different initialisations into a wider one (permutations and least squares).
"""

from jmoe.merge import (  # noqa: F401  (register their methods)
    concrete_subspace, entropy_merging, importance_fusion, masks, methods, reinforced, spherical, task_singular,
    variation, weighted,
)
from jmoe.merge.entropy_merging import prediction_entropy
from jmoe.merge.masks import tall_masks
from jmoe.merge.methods import global_magnitude_thresholds, map_merge, task_vector_merge
from jmoe.merge.registry import MERGE_METHODS, MergeMethod, Param, merge_method, register_merge_method
from jmoe.merge.tree import MergeError, Selector
from jmoe.merge.pleas import pleas
from jmoe.merge.twin_merging import twin_merging
from jmoe.merge.we_moe import wemoe
from jmoe.merge.weighted import diagonal_fisher, lm_grams

_HELPERS = [
    "MERGE_METHODS",
    "MergeError",
    "MergeMethod",
    "Param",
    "Selector",
    "diagonal_fisher",
    "global_magnitude_thresholds",
    "lm_grams",
    "map_merge",
    "merge_method",
    "pleas",
    "prediction_entropy",
    "register_merge_method",
    "tall_masks",
    "task_vector_merge",
    "twin_merging",
    "wemoe",
]


def __getattr__(name: str):
    """`jmoe.merge.<method>`: the method's row of `MERGE_METHODS` (callable)."""
    if name in MERGE_METHODS:
        return MERGE_METHODS.get(name)
    raise AttributeError(f"module 'jmoe.merge' has no attribute {name!r} (merge methods: {', '.join(MERGE_METHODS)})")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(MERGE_METHODS))


__all__ = sorted(_HELPERS + MERGE_METHODS.names())
