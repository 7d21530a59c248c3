"""Twin-Merging (Lu et al., NeurIPS 2024; reference code LZY-the-boys/Twin-Merging): the
fine-tunes' shared knowledge merged into one model, each one's exclusive knowledge kept
compressed beside it, and the two joined per input by a router.

  1. Shared: task arithmetic of the fine-tunes with scale `lam` (0.3, the reference's
     generative configuration).
  2. Exclusive: for every FFN weight of a dense layer, each fine-tune's weight minus the shared
     one, cut to its top `rank` singular triplets (8, the reference's `new_rank`), held as the
     factors of the adapter kind `twin` (`jmoe.adapters.twin`) on the shared FFN.
  3. A router per layer gives each token softmax weights over the tasks and the token runs
     the shared FFN plus the weighted exclusive parts. The routers are trained as the
     reference trains its router, to tell which task an input comes from: cross-entropy of
     each layer's router logits against the task of the batch at every position of the input
     the model has read (up to each row's last masked position), with Adam (lr 5e-4, the
     reference's).

Deliberate differences: the reference routes once per input from the shared model's last
hidden state averaged over the input and merges every weight matrix; a causal language model
routes each token at each layer from what it has read, and only the FFNs carry exclusive
knowledge (attention, norms and embeddings are the shared ones). Like WEMoE, the result is
another architecture and learns from data, so it is a function of the models and data, not a
row of the pytree method table, and `jmoe merge` cannot run it out of core.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jmoe.merge.routed import check_inputs, stacked_deltas, train_routers, upscale
from jmoe.merge.tree import MergeError


def low_rank(deltas: jax.Array, rank: int) -> dict:
    """{"A" [T, d_in, r], "B" [T, r, d_out]} with A_t B_t the best rank-r approximation of
    task t's delta (deltas: [T, d_in, d_out]; A = U_r S_r, B = V_r^T)."""
    u, s, vt = jnp.linalg.svd(deltas, full_matrices=False)
    return {"A": u[..., :rank] * s[..., None, :rank], "B": vt[..., :rank, :]}


def read_positions(mask: jax.Array) -> jax.Array:
    """[B, S] true at every position up to each row's last true position of mask [B, S]."""
    m = jnp.asarray(mask, bool)
    return jnp.flip(jnp.cumsum(jnp.flip(m, -1), -1), -1) > 0


def router_task_loss(cfg, state: dict | None = None) -> Callable[[dict, Any, int], jax.Array]:
    """loss(params, (tokens, mask), task) -> mean over the adapted layers of the cross-entropy
    of the router logits against `task` at the positions the model has read."""
    from jmoe.nn import lm_apply

    def loss(params, batch, task):
        tokens, mask = batch
        _, aux = lm_apply(params, jnp.asarray(tokens), cfg, state=state)
        where = read_positions(mask).reshape(-1).astype(jnp.float32)
        per_layer = []
        for a in aux.adapters.values():
            ce = -jax.nn.log_softmax(a.router_logits, -1)[:, task]
            per_layer.append(jnp.sum(ce * where) / jnp.maximum(jnp.sum(where), 1.0))
        return jnp.mean(jnp.stack(per_layer))

    return loss


def twin_merging(cfg, base: dict, models: Sequence[dict], batches: Sequence[Sequence[Any]], *,
                 state: dict | None = None, lam: float = 0.3, rank: int = 8, router_hidden: int = 2, steps: int = 300,
                 lr: float = 5e-4, seed: int = 0, log: Callable[[int, float], None] | None = None) -> tuple[Any, dict]:
    """Twin-Merging of the fine-tunes `models` of `base` (LM params of LMConfig `cfg`; see the
    module docstring). batches: one sequence of (tokens [B, S], mask [B, S]) batches per model,
    inputs of that model's task; step s uses batch s mod len of each. log(step, loss) is called
    every step. Returns (the model's LMConfig, its params)."""
    from jmoe.merge.methods import task_arithmetic

    check_inputs("twin_merging", cfg, base, models, batches, steps, lr)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeError(f"twin_merging: rank={rank!r} must be a positive integer")
    shared = task_arithmetic(base, list(models), lam=lam)

    def experts(layer, proj, w):
        f = low_rank(stacked_deltas(models, shared, layer, w), rank)
        return jax.tree.map(lambda x: x.astype(shared["layers"][layer]["ffn"][w].dtype), f)

    tcfg, params = upscale("twin_merging", cfg, shared, shared,
                           dict(kind="twin", num_experts=len(models), rank=rank, options={"router_hidden": router_hidden}),
                           experts, seed)
    return tcfg, train_routers(params, router_task_loss(tcfg, state), batches, steps=steps, lr=lr, log=log)
