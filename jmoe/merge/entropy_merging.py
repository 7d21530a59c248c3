"""AdaMerging (Yang et al., ICLR 2024; reference code EnnengYang/AdaMerging): task-arithmetic
coefficients learned on unlabeled inputs of the tasks by minimising the entropy of the merged
model's predictions.

merged = base + sum_i lambda_i * (m_i - base), with
  granularity="task"   one lambda per task (task-wise AdaMerging),
  granularity="layer"  one lambda per task and parameter tensor (layer-wise AdaMerging; the
                       reference's "layer" is each parameter tensor of the model).
The lambdas start at `prior` (0.3), are clipped to [0, 1] where they are used, and are
trained with Adam (lr 1e-3, the reference's 500 steps) on objective(merged params, batch),
summed over one batch per task per step: for language models the mean entropy of the
next-token distribution where the caller's mask says (`prediction_entropy`). The step is
jit-compiled once.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from jmoe.merge.registry import Param, merge_method
from jmoe.merge.tree import MergeError, check_compatible, check_models


def _granularity(value) -> str | None:
    return None if value in ("task", "layer") else "must be 'task' or 'layer'"


def prediction_entropy(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean entropy (nats) of softmax(logits [..., V]) over the positions where `mask` [...]
    is true (all positions without a mask)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    if mask is None:
        return jnp.mean(ent)
    m = mask.astype(jnp.float32)
    return jnp.sum(ent * m) / jnp.maximum(jnp.sum(m), 1.0)


def check_inputs(method: str, base, models, batches, steps: int, lr: float) -> None:
    """Checks what a method that learns from unlabeled inputs takes: the models and the base
    (the same trees), one non-empty sequence of batches per model and the training settings;
    each problem one MergeError naming `method`."""
    check_models(models)
    if base is None:
        raise MergeError(f"base is required for {method} (it learns from the task vectors m_i - base)")
    check_compatible(base, models, [f"models[{i}]" for i in range(len(models))])
    if not isinstance(batches, (list, tuple)) or len(batches) != len(models) or not all(len(b) for b in batches):
        raise MergeError(f"{method} needs batches: one non-empty sequence of unlabeled batches per model "
                         f"({len(models)}), got {type(batches).__name__}"
                         f"{' of ' + str(len(batches)) if isinstance(batches, (list, tuple)) else ''}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise MergeError(f"{method}: steps={steps!r} must be an integer >= 0")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise MergeError(f"{method}: lr={lr!r} must be a number > 0")


def check_token_batches(method: str, batches, vocab_size: int, *, masked: bool = True) -> None:
    """Each batch of a language model's data checked: one sequence of (tokens [B, S], mask
    [B, S]) pairs per task, or (masked=False) one sequence of token arrays; integer tokens in
    [0, vocab_size). A MergeError naming `batches[t][j]` (`batches[j]`) otherwise."""
    import numpy as np

    for t, task in enumerate(batches if masked else [batches]):
        for j, batch in enumerate(task):
            where = f"{method}: batches[{t}][{j}]" if masked else f"{method}: batches[{j}]"
            if masked:
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise MergeError(f"{where} must be a (tokens [B, S], mask [B, S]) pair")
                tokens, mask = np.asarray(batch[0]), np.asarray(batch[1])
                if mask.shape != tokens.shape:
                    raise MergeError(f"{where}: mask shape {mask.shape} differs from tokens shape {tokens.shape}")
            else:
                tokens = np.asarray(batch)
            if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
                raise MergeError(f"{where}: tokens must be an integer array [B, S], got {tokens.dtype}{tokens.shape}")
            if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
                raise MergeError(f"{where}: token ids must be in [0, {vocab_size}), got {tokens.min()}..{tokens.max()}")


def merge_with(base, deltas, lambdas, granularity: str):
    """base + sum_i clip(lambda_i, 0, 1) * delta_i, leaf by leaf (floating leaves only)."""
    lam = jnp.clip(lambdas, 0.0, 1.0)  # [T] or [leaves, T]
    leaves, treedef = jax.tree.flatten(base)
    dl = [jax.tree.leaves(d) for d in deltas]
    out = []
    for j, b in enumerate(leaves):
        if not jnp.issubdtype(jnp.asarray(b).dtype, jnp.floating):
            out.append(b)
            continue
        row = lam if granularity == "task" else lam[j]
        mixed = sum(row[i] * dl[i][j].astype(jnp.float32) for i in range(len(deltas)))
        out.append((b.astype(jnp.float32) + mixed).astype(b.dtype))
    return jax.tree.unflatten(treedef, out)


def learn_lambdas(base, deltas: Sequence[Any], batches: Sequence[Sequence[Any]], *, objective, granularity: str,
                  steps: int, lr: float, prior: float, log: Callable[[int, float], None] | None = None) -> jax.Array:
    """AdaMerging's coefficients ([T], or [leaves, T] layer-wise; unclipped) of the task
    vectors `deltas` (trees like base, float32) over base, learned as `adamerging` learns them."""
    T = len(deltas)
    lambdas = jnp.full((T,) if granularity == "task" else (len(jax.tree.leaves(base)), T), prior, jnp.float32)
    return fit(lambdas, lambda lam, step_batches: sum(objective(merge_with(base, deltas, lam, granularity), b)
                                                      for b in step_batches), batches, steps=steps, lr=lr, log=log)


def fit(x, loss: Callable[[Any, list], jax.Array], batches: Sequence[Sequence[Any]], *, steps: int, lr: float,
        log: Callable[[int, float], None] | None = None):
    """x after `steps` Adam steps (lr) on loss(x, step batches): step s gets batch s mod len of
    each task's sequence of batches. The step is jit-compiled once; log(step, loss) every step."""
    opt = optax.adam(lr)
    state = opt.init(x)

    @jax.jit
    def step(x, state, step_batches):
        value, grad = jax.value_and_grad(loss)(x, step_batches)
        updates, state = opt.update(grad, state, x)
        return optax.apply_updates(x, updates), state, value

    for s in range(steps):
        x, state, value = step(x, state, [b[s % len(b)] for b in batches])
        if log is not None:
            log(s, float(value))
    return x


@merge_method(Param("granularity", valid=_granularity), Param("steps", convert=int), Param("lr", convert=float),
              Param("prior", convert=float))
def adamerging(base, models, batches: Sequence[Sequence[Any]], *, objective: Callable[[Any, Any], jax.Array],
               granularity: str = "layer", steps: int = 500, lr: float = 1e-3, prior: float = 0.3,
               log: Callable[[int, float], None] | None = None, return_lambdas: bool = False):
    """AdaMerging (see the module docstring).

    objective(params, batch) -> scalar to minimise (e.g. `prediction_entropy` of the model's
    logits on an unlabeled batch); batches: one sequence of batches per task (step s uses
    batch s mod len of each task's). log(step, loss) is called every step. Returns the merged tree
    (and the clipped lambdas, [T] or [leaves, T], with return_lambdas).
    """
    check_inputs("adamerging", base, models, batches, steps, lr)
    problem = _granularity(granularity)
    if problem:
        raise MergeError(f"adamerging: granularity={granularity!r} {problem}")
    deltas = [jax.tree.map(lambda m, b: (jnp.asarray(m, jnp.float32) - jnp.asarray(b, jnp.float32))
                           if jnp.issubdtype(jnp.asarray(b).dtype, jnp.floating) else jnp.zeros(()), m, base)
              for m in models]
    lambdas = learn_lambdas(base, deltas, batches, objective=objective, granularity=granularity, steps=steps, lr=lr,
                            prior=prior, log=log)
    merged = merge_with(base, deltas, lambdas, granularity)
    return (merged, jnp.clip(lambdas, 0.0, 1.0)) if return_lambdas else merged
