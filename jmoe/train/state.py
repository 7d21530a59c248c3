"""The train state of a run: the optimizer (AdamW, warmup + cosine) and the state pytree.

A train state is a dict: "step" and "data_position" (int32 scalars), "params", "opt_state",
"rng" (PRNG key data) and, when the routers keep state, "router_state". Checkpoints hold
exactly this tree; `abstract_train_state` gives its shapes without allocating it. A run that
fine-tunes adapters on a frozen model (`TrainConfig.base_from`) holds only the adapters as
"params" (and only their state as "router_state"): the frozen model is read from its source.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jmoe.adapters import init_adapter_state, init_adapters
from jmoe.nn.transformer import LMConfig, init_lm, init_lm_state
from jmoe.train import rebalance
from jmoe.train.config import TrainConfig


def make_optimizer(tc: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decay on matrices only) with global-norm clipping; warmup + cosine learning rate."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.lr,
        warmup_steps=max(tc.warmup_steps, 1),
        decay_steps=max(tc.steps, tc.warmup_steps + 1),
        end_value=tc.lr * tc.min_lr_ratio,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(
        clip_by_global_norm(tc.grad_clip),
        optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask),
    )
    if tc.train_only:  # the rest is frozen: zero updates, no optimizer state
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   lambda params: trainable_labels(params, tc.train_only))
    return tx, schedule


def global_norm(tree, weights=None) -> jax.Array:
    """sqrt(sum over the leaves of sum(weight * leaf^2)); weights: a tree like `tree` of factors
    that broadcast against its leaves (None: all 1, `optax.tree.norm`)."""
    if weights is None:
        return optax.tree.norm(tree)
    squares = jax.tree.map(lambda g, w: jnp.sum(w * jnp.square(g.astype(jnp.float32))), tree, weights)
    return jnp.sqrt(sum(jax.tree.leaves(squares)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """`optax.clip_by_global_norm` whose norm may weigh the updates' elements: with
    `update(..., norm_weights=tree)` (`global_norm`), e.g. the copies of a replicated expert
    held in their slots count once (`jmoe.train.rebalance.copy_weights`)."""

    def update(updates, state, params=None, *, norm_weights=None, **extra):
        del params, extra
        g_norm = global_norm(updates, norm_weights)
        trigger = g_norm < max_norm
        clip = lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm)
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def trainable_labels(params, names) -> dict:
    """"train" for every leaf under a key in `names`, "frozen" for the others."""
    names = set(names)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if names & {str(getattr(k, "key", k)) for k in path} else "frozen", params)


def init_train_state(model_cfg: LMConfig, tc: TrainConfig, tx) -> dict:
    """A fresh train state from `tc.seed`: "step" and "data_position" (int32 zeros), "params",
    "opt_state" (`tx.init`), "rng" (key data), and "router_state" when the routers keep state."""
    key = jax.random.key(tc.seed)
    k_init, k_run = jax.random.split(key)
    params = init_adapters(k_init, model_cfg) if tc.base_from else init_lm(k_init, model_cfg)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "data_position": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(k_run),
    }
    router_state = init_adapter_state(model_cfg) if tc.base_from else init_lm_state(model_cfg)
    if not tc.base_from:
        router_state = {**router_state, **rebalance.initial_state(model_cfg, tc)}
    if router_state:
        state["router_state"] = router_state
    return state


def abstract_train_state(model_cfg: LMConfig, tc: TrainConfig):
    """The train state's shapes and dtypes (`jax.eval_shape`), without allocating it."""
    tx, _ = make_optimizer(tc)
    return jax.eval_shape(lambda: init_train_state(model_cfg, tc, tx))
