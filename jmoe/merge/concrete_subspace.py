"""CONCRETE (Tang et al., 2023, "Concrete Subspace Learning based Interference Elimination for
Multi-task Model Fusion"; reference code: FusionBench's concrete_subspace methods): a mask over
the parameters, shared by every task, learned through a concrete (Gumbel-sigmoid) relaxation by
minimising the merged model's prediction entropy on unlabeled inputs of the tasks, so that the
merge keeps the part of the task vectors where they do not interfere.

The mask has one logit per parameter, starting at `initial_logits` (0: keep probability 1/2).
Each step samples a continuous mask m = sigmoid((logit + log u - log(1 - u)) / temperature),
u ~ U(0, 1), divides it by its mean over each tensor, and merges

  merged = base + sum_i lambda_i * (m * tau_i),    tau_i = models[i] - base,

with the entropy summed over one batch per task; Adam (lr 1e-3) updates the logits.

  adamerging=None     Concrete Task Arithmetic: lambda_i = lam (0.3); `steps` defaults to the
                      reference's 2000.
  adamerging="task"   Concrete AdaMerging, one lambda per task, or per task and parameter tensor
  adamerging="layer"  ("layer"). Each of the `steps` (default 1000) is a meta-learning step:
                      lambda is reset to `lam`, takes one Adam step of lr `inner_lr` (1, its
                      Adam state kept across steps, unclipped) on the entropy of the merge
                      with the mask held fixed; then the mask takes its step through the merge
                      with the updated lambdas held fixed. Finally the lambdas are learned
                      afresh as `jmoe.merge.adamerging` learns them (`adamerging_steps` 1000,
                      lr 1e-3, clipped to [0, 1]) on the task vectors masked by one sampled mask.

The result merges with one continuous mask sampled at the end (the reference's evaluation
mask). Both steps are jit-compiled once; the sampling noise comes from `seed`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from jmoe.merge.entropy_merging import _granularity, check_inputs, learn_lambdas, merge_with
from jmoe.merge.registry import Param, merge_method
from jmoe.merge.tree import MergeError


def _variant(value) -> str | None:
    return None if value is None else _granularity(value) and "must be None, 'task' or 'layer'"


def _positive(value) -> str | None:
    return None if value > 0 else "must be > 0"


def sample_mask(logits: Sequence[jax.Array], key: jax.Array, temperature: float) -> list[jax.Array]:
    """One continuous concrete sample per logit tensor, divided by its mean over the tensor:
    sigmoid((logits + log u - log(1 - u)) / temperature) / mean, u ~ U(0, 1)."""
    out = []
    for logit, k in zip(logits, jax.random.split(key, len(logits))):
        u = jax.random.uniform(k, logit.shape, jnp.float32, minval=1e-6, maxval=1.0 - 1e-6)
        m = jax.nn.sigmoid((logit + jnp.log(u) - jnp.log1p(-u)) / temperature)
        out.append(m / jnp.mean(m))
    return out


@merge_method(Param("adamerging", valid=_variant), Param("steps", convert=int), Param("lr", convert=float),
              Param("temperature", convert=float, valid=_positive), Param("lam", convert=float),
              Param("initial_logits", convert=float), Param("inner_lr", convert=float, valid=_positive),
              Param("adamerging_steps", convert=int), Param("adamerging_lr", convert=float, valid=_positive))
def concrete(base, models, batches: Sequence[Sequence[Any]], *, objective: Callable[[Any, Any], jax.Array],
             adamerging: str | None = None, steps: int | None = None, lr: float = 1e-3, temperature: float = 0.5,
             lam: float = 0.3, initial_logits: float = 0.0, inner_lr: float = 1.0, adamerging_steps: int = 1000,
             adamerging_lr: float = 1e-3, seed: int = 0, log: Callable[[int, float], None] | None = None,
             return_mask: bool = False):
    """CONCRETE (see the module docstring).

    objective(params, batch) -> scalar to minimise (e.g. `prediction_entropy` of the model's
    logits on an unlabeled batch); batches: one sequence of batches per task (mask step s uses
    batch s mod len of each task's; a meta-learning step uses batches 2s and 2s + 1).
    log(step, loss) is called at every mask step, then at every AdaMerging step (numbered on).
    Returns the merged tree (and the learned keep probabilities sigmoid(logits), a tree like
    base with 1 at leaves that are not floating point, with return_mask).
    """
    if steps is None:
        steps = 2000 if adamerging is None else 1000
    check_inputs("concrete", base, models, batches, steps, lr)
    problem = _variant(adamerging)
    if problem:
        raise MergeError(f"concrete: adamerging={adamerging!r} {problem}")
    for name, value in (("temperature", temperature), ("inner_lr", inner_lr), ("adamerging_lr", adamerging_lr)):
        if _positive(value):
            raise MergeError(f"concrete: {name}={value} {_positive(value)}")
    if adamerging_steps < 0:
        raise MergeError(f"concrete: adamerging_steps={adamerging_steps} must be >= 0")

    leaves, treedef = jax.tree.flatten(base)
    floating = [i for i, b in enumerate(leaves) if jnp.issubdtype(jnp.asarray(b).dtype, jnp.floating)]
    model_leaves = [jax.tree.leaves(m) for m in models]
    base_f = [jnp.asarray(leaves[i], jnp.float32) for i in floating]
    # the task vectors of each floating leaf, stacked: [T, *shape]
    deltas = [jnp.stack([jnp.asarray(ml[i], jnp.float32) for ml in model_leaves]) - b[None]
              for i, b in zip(floating, base_f)]
    T = len(models)

    def merged(mask, lam_):
        """base + mask * sum_i lambda_i tau_i; lam_ [T] or [floating leaves, T]."""
        out = list(leaves)
        for j, i in enumerate(floating):
            row = lam_ if lam_.ndim == 1 else lam_[j]
            out[i] = (base_f[j] + mask[j] * jnp.tensordot(row, deltas[j], 1)).astype(jnp.asarray(leaves[i]).dtype)
        return jax.tree.unflatten(treedef, out)

    def total(params, step_batches):
        return sum(objective(params, b) for b in step_batches)

    logits = [jnp.full(b.shape, initial_logits, jnp.float32) for b in base_f]
    opt = optax.adam(lr)
    opt_state = opt.init(logits)
    key = jax.random.key(seed)
    fixed = jnp.full((T,), lam, jnp.float32)

    @jax.jit
    def ta_step(logits, opt_state, key, step_batches):
        loss, grad = jax.value_and_grad(lambda lg: total(merged(sample_mask(lg, key, temperature), fixed),
                                                         step_batches))(logits)
        updates, opt_state = opt.update(grad, opt_state, logits)
        return optax.apply_updates(logits, updates), opt_state, loss

    lam0 = jnp.full((T,) if adamerging == "task" else (len(floating), T), lam, jnp.float32)
    inner = optax.adam(inner_lr)
    inner_state = inner.init(lam0)

    @jax.jit
    def meta_step(logits, opt_state, inner_state, key, inner_batches, outer_batches):
        held = [jax.lax.stop_gradient(m) for m in sample_mask(logits, key, temperature)]
        g = jax.grad(lambda l_: total(merged(held, l_), inner_batches))(lam0)
        updates, inner_state = inner.update(g, inner_state, lam0)
        lam1 = jax.lax.stop_gradient(optax.apply_updates(lam0, updates))
        loss, grad = jax.value_and_grad(lambda lg: total(merged(sample_mask(lg, key, temperature), lam1),
                                                         outer_batches))(logits)
        updates, opt_state = opt.update(grad, opt_state, logits)
        return optax.apply_updates(logits, updates), opt_state, inner_state, loss

    for s in range(steps):
        k = jax.random.fold_in(key, s)
        if adamerging is None:
            logits, opt_state, loss = ta_step(logits, opt_state, k, [b[s % len(b)] for b in batches])
        else:
            logits, opt_state, inner_state, loss = meta_step(
                logits, opt_state, inner_state, k, [b[2 * s % len(b)] for b in batches],
                [b[(2 * s + 1) % len(b)] for b in batches])
        if log is not None:
            log(s, float(loss))

    mask = sample_mask(logits, jax.random.fold_in(key, steps), temperature)
    if adamerging is None:
        out = merged(mask, fixed)
    else:
        # the masked task vectors m * tau_t, kept in float32 (a rounded model would lose them)
        masked = []
        for t in range(T):
            row = [jnp.zeros(()) for _ in leaves]
            for j, i in enumerate(floating):
                row[i] = mask[j] * deltas[j][t]
            masked.append(jax.tree.unflatten(treedef, row))
        lambdas = learn_lambdas(base, masked, batches, objective=objective, granularity=adamerging,
                                steps=adamerging_steps, lr=adamerging_lr, prior=lam,
                                log=None if log is None else (lambda s, loss: log(steps + s, loss)))
        out = merge_with(base, masked, lambdas, adamerging)
    if not return_mask:
        return out
    keep = list(jnp.ones(()) for _ in leaves)
    for j, i in enumerate(floating):
        keep[i] = jax.nn.sigmoid(logits[j])
    return out, jax.tree.unflatten(treedef, keep)
