"""Expert parallelism: the MoE layer under `shard_map` on a device mesh.

Experts are split over the mesh's "expert" axis (E / n_ep per device); tokens over the
token axes ("data", "fsdp", "expert"); expert parameters sharded on "fsdp" are gathered
where used, and on "model" run tensor-parallel (each device holds a slice of the hidden
width and the partial outputs are summed). Each token shard runs the same layer body as
the single-device layer (`jmoe.layer.layer_body`), with a token exchange
(`jmoe.parallel.exchange`) as its dispatch: "padded", "ragged" or "allgather"; "auto" is
ragged on GPU/TPU and padded on CPU. The layer's `dispatch` ("dropless" or "capacity")
decides whether the exchange may drop token-slots and how many.

Balance losses and load statistics are computed from counts and probabilities summed over
all token shards, so the layer's outputs, aux losses and gradients equal the single-device
layer's when nothing is dropped.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jmoe.layer import MoEAux, flatten_tokens, layer_body, sequence_length
from jmoe.parallel.exchange import (  # noqa: F401  (re-exported)
    EXCHANGES,
    MESH_DISPATCHES,
    Exchange,
    ep_assignment,
    exclusive_cumsum,
    ragged_all_to_all_emulated,
    ragged_offsets,
    ragged_supported,
)
from jmoe.parallel.mesh import axis_size, token_axes
from jmoe.parallel.rules import DEFAULT_RULES, partition_specs
from jmoe.registry import BALANCE_LOSSES, DISPATCHERS

EP_IMPLS = ("auto",) + EXCHANGES


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Run MoE layers expert-parallel on `mesh`; pass as `moe_layer(..., ep=ExpertParallel(mesh))`.

    impl: the token exchange, "auto" | "padded" | "ragged" | "allgather".
    """

    mesh: Mesh
    impl: str = "auto"

    def __post_init__(self):
        if self.impl not in EP_IMPLS:
            raise ValueError(f"ExpertParallel.impl={self.impl!r} is unknown; known: {', '.join(EP_IMPLS)}")

    def resolved_impl(self) -> str:
        if self.impl != "auto":
            return self.impl
        return "ragged" if ragged_supported(self.platform) else "padded"

    @property
    def platform(self) -> str:
        return self.mesh.devices.flat[0].platform

    def exchange(self, tensor_parallel: bool = False) -> Exchange:
        """The dispatcher that moves token-slots over this mesh's expert axis."""
        return Exchange(self.resolved_impl(), axis_size(self.mesh, "expert"), tensor_parallel,
                        ragged_supported(self.platform))

    def apply(self, params, x, cfg, *, state=None, key=None, carry=None, balance_counts=None):
        return ep_moe_layer(params, x, cfg, self, state=state, key=key, carry=carry, balance_counts=balance_counts)


def _gather_sharded_dims(tree, specs, axis: str):
    """all_gather every dimension sharded on `axis` (FSDP-style use of sharded parameters)."""

    def gather(x, spec):
        for dim, entry in enumerate(spec):
            names = entry if isinstance(entry, tuple) else (entry,)
            if axis in names:
                x = lax.all_gather(x, axis, axis=dim, tiled=True)
        return x

    return jax.tree.map(gather, tree, specs, is_leaf=lambda s: isinstance(s, P))


def _sharded_on(specs, axis: str) -> bool:
    for spec in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)):
        for entry in spec:
            if axis in (entry if isinstance(entry, tuple) else (entry,)):
                return True
    return False


def _check(cfg, mesh, n, T, shards, seq_len):
    if cfg.num_experts % n:
        raise ValueError(f"num_experts={cfg.num_experts} is not divisible by the mesh's expert axis ({n})")
    if n > 1 and cfg.dispatch not in MESH_DISPATCHES:
        raise ValueError(
            f"MoEConfig.dispatch={cfg.dispatch!r} cannot run expert-parallel on mesh {dict(mesh.shape)}; "
            f"use one of {', '.join(MESH_DISPATCHES)}"
        )
    if T % shards:
        raise ValueError(f"{T} tokens do not split evenly over the {shards} token shards of mesh {dict(mesh.shape)}")
    if (T // shards) % seq_len and BALANCE_LOSSES.get(cfg.balance_loss).scope_for(cfg) == "sequence":
        raise ValueError(f"sequence-scoped balance losses need whole sequences per shard ({T // shards} tokens, seq_len {seq_len})")


def aux_specs(token_spec: P, num_ffn_choices: int) -> MoEAux:
    """Partition specs of a `MoEAux`: scalars and per-choice statistics are replicated, the
    routing is sharded like the tokens."""
    fields = {f.name: P() for f in dataclasses.fields(MoEAux) if f.name not in ("routing", "num_ffn_choices")}
    return MoEAux(**fields, routing=token_spec, num_ffn_choices=num_ffn_choices)


def ep_moe_layer(params, x, cfg, ep: ExpertParallel, *, state=None, key=None, carry=None, balance_counts=None):
    """`moe_layer` on `ep.mesh`. x: [..., d] (global); returns (y [..., d], MoEAux).

    The aux's routing arrays (and the carry) are per token, sharded like the tokens; its
    losses and loads are global.
    """
    mesh = ep.mesh
    n = axis_size(mesh, "expert")
    taxes = token_axes(mesh)
    shards = math.prod(axis_size(mesh, a) for a in taxes)
    seq_len = sequence_length(x.shape)
    xt = flatten_tokens(x, cfg)
    _check(cfg, mesh, n, xt.shape[0], shards, seq_len)
    pspecs = partition_specs(params, mesh, DEFAULT_RULES)
    model_axis = axis_size(mesh, "model") > 1
    tp = model_axis and all(_sharded_on(pspecs["experts"][name], "model") for name in pspecs["experts"])
    tp_shared = "shared" in params and model_axis and _sharded_on(pspecs["shared"], "model")
    dispatch = ep.exchange(tp) if n > 1 else None
    tok_spec = P(taxes or None)
    has_key = key is not None
    psum = (lambda v: lax.psum(v, taxes)) if taxes else (lambda v: v)

    def gathered(params):
        """The layer's parameters as the body uses them: FSDP shards gathered, tensor-parallel
        slices kept only where the computation is tensor-parallel."""
        out = dict(params)
        for name, is_tp in (("experts", tp), ("shared", tp_shared)):
            if name in params:
                tree = _gather_sharded_dims(params[name], pspecs[name], "fsdp")
                out[name] = tree if is_tp else _gather_sharded_dims(tree, pspecs[name], "model")
        return out

    def local(params, xt, state, key, carry, balance_counts):
        if has_key:  # a different jitter per token shard
            idx = 0
            for a in taxes:
                idx = idx * axis_size(mesh, a) + lax.axis_index(a)
            key = jax.random.fold_in(key, idx)
        return layer_body(
            gathered(params), xt, cfg, dispatch=dispatch or DISPATCHERS.get(cfg.dispatch), state=state,
            key=key if has_key else None, carry=carry, balance_counts=balance_counts, seq_len=seq_len,
            reduce=psum, shards=shards, partial_sum=(lambda v: lax.psum(v, "model")) if tp_shared else (lambda v: v),
        )

    key_arg = key if has_key else jnp.zeros((), jnp.uint32)
    # check_vma=False: the dropless loop's lax.switch mixes device-invariant (empty chunk)
    # and device-varying branches; gradients are checked against the single-device layer.
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(pspecs, tok_spec, jax.tree.map(lambda _: P(), state), P(), tok_spec, P()),
        out_specs=(tok_spec, aux_specs(tok_spec, cfg.num_ffn_choices)),
        check_vma=False,
    )
    y, aux = fn(params, xt, state, key_arg, carry, balance_counts)
    return y.reshape(x.shape[:-1] + (cfg.d_model,)), aux
