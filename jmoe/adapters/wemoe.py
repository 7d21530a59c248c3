"""WEMoE: a weight-ensembling mixture of task vectors on a frozen FFN (Tang et al., ICML 2024,
"Merging Multi-Task Models via Weight-Ensembling Mixture of Experts"; reference code
tanganke/fusion_bench, `fusion_bench/models/we_moe.py`).

Expert e of a layer is task vector e of each targeted projection, tau_e = W_e - W (a fine-tune's
weight minus the pretrained one). A router turns the token into one weight per task vector,
and the token runs the FFN whose weights are merged for it:

  W(x) = W + sum_e r_e(x) tau_e,        r(x) = fc2(relu(fc1(x)))   (router_hidden_layers=2)

with r(x) = fc(x) for one hidden layer and r = a learned vector (the same for every token) for
none. The router's weights start at N(0, 0.01), its hidden bias at 0 and its output bias at
`init_lambda`, so the layer starts as task arithmetic with that scale. The weights are not
normalised (no softmax), as in the reference.

The reference merges once per sample with the router's outputs averaged over the sequence.
A causal language model cannot look ahead, so here each token takes its own weights; that is
the reference's rule on a one-token sequence, and it makes the layer run unchanged under
KV-cached decoding. With `batch_reduce` the weights are averaged over every token of the call
and the FFN is merged once (the reference's mode while its routers train, E times cheaper). Because each projection is linear in its weight,
x W(x) = x W + sum_e r_e(x) (x tau_e): the inputs scaled by each weight, side by side, times the
task vectors stacked: one matmul of width E * d_in per projection, exactly the per-token merged
weight.

`jmoe.merge.wemoe` builds these adapters from a base and its fine-tunes and trains only the
routers, on unlabeled inputs (entropy minimisation); a fresh adapter has zero task vectors.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe.adapters.base import Adapter, adapted_ffn, no_aux
from jmoe.options import Options, option
from jmoe.registry import ADAPTERS


@dataclasses.dataclass(frozen=True)
class WEMoEOptions(Options):
    """router_hidden_layers: 0 (one learned weight per task vector, the same for every token),
    1 (a linear router) or 2 (Linear, ReLU, Linear: the reference's default). init_lambda: the
    router's initial output, i.e. the task-arithmetic scale the layer starts from.
    batch_reduce: one set of weights for all tokens of a call, their mean (training only:
    it lets a token's weights depend on other sequences and on later tokens)."""

    router_hidden_layers: int = option(2, choices=(0, 1, 2))
    init_lambda: float = option(0.3)
    batch_reduce: bool = False


def init_router(key: jax.Array, d_model: int, num_experts: int, opts: WEMoEOptions, dtype) -> dict:
    """The router's parameters (see the module docstring for the init)."""
    k1, k2 = jax.random.split(key)
    bias = jnp.full((num_experts,), opts.init_lambda, dtype)
    if opts.router_hidden_layers == 0:
        return {"weights": bias}
    if opts.router_hidden_layers == 1:
        return {"w": (0.01 * jax.random.normal(k1, (d_model, num_experts))).astype(dtype), "b": bias}
    return {"w1": (0.01 * jax.random.normal(k1, (d_model, d_model))).astype(dtype), "b1": jnp.zeros((d_model,), dtype),
            "w2": (0.01 * jax.random.normal(k2, (d_model, num_experts))).astype(dtype), "b2": bias}


def router_weights(router: dict, x: jax.Array) -> jax.Array:
    """The task-vector weights [T, E] of tokens x [T, d] (float32)."""
    x = x.astype(jnp.float32)
    f = lambda name: router[name].astype(jnp.float32)
    if "weights" in router:
        return jnp.broadcast_to(f("weights"), (x.shape[0], router["weights"].shape[0]))
    if "w" in router:
        return x @ f("w") + f("b")
    return jax.nn.relu(x @ f("w1") + f("b1")) @ f("w2") + f("b2")


def _init(key, shapes, cfg, dtype):
    d_model = shapes["down"][1] if "down" in shapes else next(iter(shapes.values()))[0]
    params = {"router": init_router(key, d_model, cfg.num_experts, cfg.options, dtype)}
    for name, (d_in, d_out) in shapes.items():
        params[name] = jnp.zeros((cfg.num_experts, d_in, d_out), dtype)
    return params


def _apply(base, params, x, activation, cfg, *, state=None, key=None):
    r = router_weights(params["router"], x)  # [T, E]

    def project(name, inputs, w):
        if cfg.options.batch_reduce and name in params:
            merged = w.astype(jnp.float32) + jnp.einsum("e,eio->io", jnp.mean(r, 0), params[name].astype(jnp.float32))
            return inputs @ merged.astype(inputs.dtype)
        y = inputs @ w.astype(inputs.dtype)
        if name not in params:
            return y
        tv = params[name]  # [E, d_in, d_out]
        E, d_in, d_out = tv.shape
        scaled = (r.astype(inputs.dtype)[:, :, None] * inputs[:, None, :]).reshape(-1, E * d_in)
        return y + scaled @ tv.reshape(E * d_in, d_out).astype(inputs.dtype)

    return adapted_ffn(base, x, activation, project), no_aux()


def _check(cfg):
    if cfg.dropout:
        raise ValueError(f"AdapterConfig.dropout={cfg.dropout} does not apply to wemoe (its task vectors take no "
                         "dropout); set it to 0")


WEMOE = ADAPTERS.add("wemoe", Adapter(init=_init, apply=_apply, check=_check), options=WEMoEOptions)
