"""VaRM, FuseChat's variation-ratio merge (Wan et al., "FuseChat: Knowledge Fusion of Chat Models";
reference code fanqiwan/FuseAI, FuseChat/merge/VaRM): a weighted average of the fine-tunes in
which each parameter matrix has its own weights, the fine-tunes' shares of the change of that
matrix from the base,

    v_i = mean over the matrix of (m_i - base)^2      (variation="square", the paper's; "abs": |m_i - base|)
    w_i = v_i / sum_j v_j                             (or softmax(v / temperature))
    merged = sum_i w_i m_i,

so the model that moved a matrix most contributes most to it. A matrix that some fine-tune left
unchanged is averaged with equal weights, as in the reference. Tensor by tensor, so `jmoe merge`
runs it out of core.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.merge.methods import _f32, map_merge
from jmoe.merge.registry import Param, merge_method
from jmoe.merge.tree import MergeError, check_models


def _variation(value) -> str | None:
    return None if value in ("square", "abs") else "must be 'square' or 'abs'"


def _temperature(value) -> str | None:
    return None if value is None or value > 0 else "must be > 0"


@merge_method(Param("variation", valid=_variation), Param("temperature", convert=float, valid=_temperature),
              mergekit=True)
def varm(base, models, *, variation="square", temperature=None, filter=None, num_layers=None):
    """VaRM (see the module docstring): per tensor, the fine-tunes averaged with weights
    proportional to how much each changed it from the base (softmax(v / temperature) when a
    temperature is given)."""
    check_models(models)
    if base is None:
        raise MergeError("base is required for varm (weights come from each model's change from the base)")
    if _variation(variation):
        raise MergeError(f"varm: variation={variation!r} {_variation(variation)}")
    if _temperature(temperature):
        raise MergeError(f"varm: temperature={temperature!r} {_temperature(temperature)}")

    def leaf(path, layers, b, xs, _k):
        d = jnp.stack([_f32(x) - _f32(b) for x in xs])
        v = jnp.mean((d * d) if variation == "square" else jnp.abs(d), axis=tuple(range(1, d.ndim)))
        if temperature is not None:
            w = jax.nn.softmax(v / temperature)
        else:
            w = v / jnp.where(jnp.sum(v) > 0, jnp.sum(v), 1.0)
        w = jnp.where(jnp.any(v == 0), jnp.full_like(v, 1.0 / len(xs)), w)
        merged = jnp.tensordot(w, jnp.stack([_f32(x) for x in xs]), axes=1)
        return merged.astype(jnp.asarray(b).dtype)

    return map_merge(leaf, base, models, filter=filter, num_layers=num_layers)
