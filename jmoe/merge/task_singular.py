"""TSV-M: merging by task singular vectors (Gargiulo et al., "Task Singular Vectors: Reducing
Task Interference in Model Merging", CVPR 2025; reference code AntoAndGar/task_singular_vectors,
FusionBench's TaskSingularVectorMerging).

Per matrix (the last two axes of a leaf; leading axes, such as stacked experts, are separate
matrices), with T models and task vectors D_i = w_i (m_i - base):
  1. keep the top k = floor(min(rows, cols) * sv_reduction) singular triplets of each D_i
     (sv_reduction defaults to 1 / T, the paper's setting: the T blocks fill the rank);
  2. concatenate them: U = [U_1 ... U_T] (rows x Tk), S = diag(s_1 ... s_T), V = [V_1 ... V_T]
     (cols x Tk);
  3. whiten: U and V are replaced by their nearest matrices with orthonormal columns (the
     polar factor P Q^T of the SVD P S' Q^T), which removes the overlap between the tasks'
     singular vectors, the interference the paper measures;
  4. the merged task vector U_perp S V_perp^T, and base + lam * it.
Leaves of fewer than two axes (norms, biases) take the mean of the task vectors, as in the
reference. The result does not depend on the sign or rotation freedom of any SVD, and the
method works one tensor at a time, so `jmoe merge` runs it out of core.
"""

from __future__ import annotations

import jax.numpy as jnp

from jmoe.merge.methods import LAMBDA, WEIGHTS, _f32, _per_model, _scalar, map_merge
from jmoe.merge.registry import Param, merge_method
from jmoe.merge.tree import MergeError, check_models


def _sv_reduction(value) -> str | None:
    return None if value is None or 0.0 < value <= 1.0 else "must be in (0, 1]"


def _polar(a):
    """The nearest matrix to a [..., m, n] with orthonormal columns (or rows, when n > m)."""
    p, _, qt = jnp.linalg.svd(a, full_matrices=False)
    return p @ qt


def tsv_merge_matrix(deltas, sv_reduction: float):
    """The TSV-M merge of task-vector matrices `deltas` (each [..., m, n], leading axes batched)."""
    m, n = deltas[0].shape[-2:]
    k = int(min(m, n) * sv_reduction)
    if k == 0:  # more tasks than singular values: the reference keeps nothing either
        return jnp.zeros_like(deltas[0])
    us, ss, vts = [], [], []
    for d in deltas:
        u, s, vt = jnp.linalg.svd(d, full_matrices=False)
        us.append(u[..., :, :k])
        ss.append(s[..., :k])
        vts.append(vt[..., :k, :])
    u = _polar(jnp.concatenate(us, axis=-1))  # [..., m, Tk]
    vt = _polar(jnp.concatenate(vts, axis=-2))  # [..., Tk, n]
    return (u * jnp.concatenate(ss, axis=-1)[..., None, :]) @ vt


@merge_method(WEIGHTS, LAMBDA, Param("sv_reduction", layered=True, convert=float, valid=_sv_reduction), mergekit=True)
def tsvm(base, models, *, weights=1.0, lam=1.0, sv_reduction=None, filter=None, num_layers=None):
    """TSV-M (see the module docstring): each task vector w_i (m_i - base) cut to its top
    singular vectors, the vectors of all tasks whitened together, base + lam * the result.
    sv_reduction: the share of each matrix's rank kept per task (default 1 / len(models))."""
    check_models(models)
    n = len(models)
    w_all = _per_model(weights, n, "weights")

    def leaf(path, layers, b, xs, _k):
        w = [_scalar(wi, path, layers, "weights") for wi in w_all]
        lam_v = _scalar(lam, path, layers, "lambda")
        frac = 1.0 / n if sv_reduction is None else _scalar(sv_reduction, path, layers, "sv_reduction")
        if not 0.0 < frac <= 1.0:
            raise MergeError(f"sv_reduction={frac} at leaf {path!r} must be in (0, 1]")
        deltas = [wi * (_f32(x) - _f32(b)) for wi, x in zip(w, xs)]
        merged = tsv_merge_matrix(deltas, frac) if deltas[0].ndim >= 2 else sum(deltas) / n
        return (_f32(b) + lam_v * merged).astype(jnp.asarray(b).dtype)

    if base is None:
        raise MergeError("base is required for tsvm (it merges task vectors m_i - base)")
    return map_merge(leaf, base, models, filter=filter, num_layers=num_layers)
