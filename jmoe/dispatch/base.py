"""The dispatch contract.

A dispatcher is `fn(expert_params, x [T, d], routing, cfg) -> (y [T, d], dropped)`: it runs
the routed experts on their tokens and combines them with the routing weights. `dropped`
is the float32 count of used slots (routing mask True) that were not computed.

`expert_params` are stacked (`[E, ...]` leaves). A dispatcher that also runs the
`jmoe.experts.ExpertList` serving layout in place says so with a `takes_expert_list = True`
attribute; any other gets the list stacked by the layer.

Most dispatchers compute what the reference does, so the inference engine picks its own for
each step (dropless or gather). One that changes what the experts compute says so with
`keep_when_serving = True` and is kept (it then has a `block_size` option, which decoding steps
shrink as they do dropless's). One that keeps vectors with each expert declares them
with an `expert_vectors(cfg) -> {name: shape}` attribute: `init_experts` creates them (ones)
and the layer checks them (compressed experts).
"""

from __future__ import annotations

from functools import partial

from jmoe.experts import ffn


def expert_fn_for(cfg):
    """The per-expert function `(params of one expert, x [n, d]) -> [n, d]` of `cfg`."""
    return partial(ffn, activation=cfg.activation, dtype=cfg.dtype)
