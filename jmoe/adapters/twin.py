"""Twin-Merging's exclusive knowledge on a shared FFN (Lu et al., NeurIPS 2024, "Twin-Merging:
Dynamic Integration of Modular Expertise in Model Merging"; reference code
LZY-the-boys/Twin-Merging, `generative/eval_twin.py`).

The frozen FFN holds the shared knowledge (the fine-tunes merged). Expert e of each targeted
projection is the exclusive knowledge of task e, its fine-tune minus the shared weight, kept
at rank r by SVD: A_e [d_in, r], B_e [r, d_out]. A router gives each token softmax weights
over the tasks, and the token runs the FFN with the weights merged for it:

  W(x) = W + sum_e softmax(router(x))_e A_e B_e,   router(x) = leaky_relu(x W1 + b1) W2 + b2

Because each projection is linear in its weight, x W(x) = x W + sum_e p_e(x) (x A_e) B_e: the
cost of one LoRA of rank E * r. The reference routes each input once, from the shared model's
last hidden state averaged over the input; a causal language model routes each token from its
layer's input instead (one router per layer), which also decodes unchanged with a KV cache.
The router's logits are reported (`AdapterAux.router_logits`) so that `jmoe.merge.twin_merging`
can train it to recognise the task of its inputs, as the reference trains its router.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe.adapters.base import Adapter, AdapterAux, adapted_ffn, init_lora
from jmoe.options import Options, option
from jmoe.registry import ADAPTERS


@dataclasses.dataclass(frozen=True)
class TwinOptions(Options):
    """router_hidden: width of the router's hidden layer as a multiple of d_model (the
    reference's classifier: 2). router_init_std: std of the router's normal init."""

    router_hidden: int = option(2, ge=1)
    router_init_std: float = option(0.02, gt=0.0)


def _init(key, shapes, cfg, dtype):
    k1, k2, *keys = jax.random.split(key, len(shapes) + 2)
    d_model = shapes["down"][1] if "down" in shapes else next(iter(shapes.values()))[0]
    h, std = cfg.options.router_hidden * d_model, cfg.options.router_init_std
    params = {"router": {"w1": (std * jax.random.normal(k1, (d_model, h))).astype(dtype), "b1": jnp.zeros((h,), dtype),
                         "w2": (std * jax.random.normal(k2, (h, cfg.num_experts))).astype(dtype),
                         "b2": jnp.zeros((cfg.num_experts,), dtype)}}
    for k, (name, (d_in, d_out)) in zip(keys, shapes.items()):
        params[name] = init_lora(k, d_in, d_out, cfg.rank, dtype, experts=cfg.num_experts)
    return params


def router_logits(router: dict, x: jax.Array) -> jax.Array:
    """[T, E] logits of tokens x [T, d] (float32)."""
    f = lambda name: router[name].astype(jnp.float32)
    return jax.nn.leaky_relu(x.astype(jnp.float32) @ f("w1") + f("b1")) @ f("w2") + f("b2")


def _apply(base, params, x, activation, cfg, *, state=None, key=None):
    logits = router_logits(params["router"], x)
    probs = jax.nn.softmax(logits, axis=-1)  # [T, E]
    E = cfg.num_experts

    def project(name, inputs, w):
        y = inputs @ w.astype(inputs.dtype)
        if name not in params:
            return y
        A, B = params[name]["A"].astype(inputs.dtype), params[name]["B"].astype(inputs.dtype)  # [E, d_in, r], [E, r, d_out]
        low = jnp.einsum("ti,eir->ter", inputs, A) * probs.astype(inputs.dtype)[:, :, None]
        return y + low.reshape(inputs.shape[0], -1) @ B.reshape(-1, B.shape[-1])

    entropy = jnp.mean(-jnp.sum(probs * jnp.log(probs + 1e-20), axis=-1)) / jnp.log(E) if E > 1 else jnp.zeros(())
    z = jnp.zeros((), jnp.float32)
    aux = AdapterAux(loss=z, balance_loss=z, entropy=entropy, experts_per_token=jnp.asarray(float(E)), counts={},
                     router_logits=logits)
    return adapted_ffn(base, x, activation, project), aux


def _check(cfg):
    if cfg.dropout:
        raise ValueError(f"AdapterConfig.dropout={cfg.dropout} does not apply to twin (its experts are fixed SVD "
                         "factors); set it to 0")


TWIN = ADAPTERS.add("twin", Adapter(init=_init, apply=_apply, check=_check), options=TwinOptions)
