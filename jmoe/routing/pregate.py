"""Pre-gating (Read-ME, "Refactorizing LLMs as Router-Decoupled Mixture of Experts with System
Co-Design"): routers decoupled from the layers they route, so that every layer's experts are
known before its layers run.

Every MoE layer keeps its own linear softmax top-k router (`w [d, E]`, the `topk` router's
options), but applies it to the input of the first MoE layer instead of its own: the first MoE
layer routes its input and hands it on as the routing carry, every later MoE layer routes that
carry. Once the first MoE layer's input is known, so is every layer's routing, and an
offloading engine can fetch each layer's experts ahead of it exactly (the cross-layer gate of
`jmoe.infer.offload` is the next layer's router on the carry: for this router, the routing
itself).

The reference (VITA-Group/READ-ME) goes further: one small causal transformer over the token
ids picks one expert index (top-1, no gate weight) that every layer uses, trained to imitate
the dense model's activation sparsity. Here each layer keeps its own router, weights and top-k,
trained with the model; what is kept is the decoupling that makes routing known ahead.
"""

from __future__ import annotations

import jax

from jmoe.registry import ROUTERS
from jmoe.routing.base import Router, Routing
from jmoe.routing.topk import TopKOptions, init_linear_router, topk_route


def pregate_route(params: dict, x: jax.Array, cfg, *, state=None, key=None, carry: jax.Array | None = None) -> Routing:
    """Softmax top-k routing of the first MoE layer's input.

    Args:
      params: {"w": [d, E]}.
      x: [T, d] this layer's tokens: routed at the first MoE layer (carry None).
      carry: [T, d] the first MoE layer's input, handed on by every pregate layer.
    Returns:
      `topk`'s Routing of the first MoE layer's input, with that input as its carry.
    """
    source = x if carry is None else carry
    if source.shape != x.shape:
        raise ValueError(f"router 'pregate' got a carry of shape {tuple(source.shape)} for tokens of shape "
                         f"{tuple(x.shape)}: every MoE layer of the model must use it")
    return topk_route(params, source, cfg, key=key).replace(carry=source)


ROUTERS.add("pregate", Router(init=init_linear_router, apply=pregate_route), options=TopKOptions)
