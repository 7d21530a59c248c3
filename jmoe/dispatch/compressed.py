"""Compressed experts: a token's lowest-ranked experts replaced by scaling vectors that modulate
its main experts (He et al., 2025, "Efficiently Editing Mixture-of-Experts Models with Compressed
Experts"; the reference is `OlmoeSparseCompressedMoeBlock` of yifei-he/Compressed-Experts).

Every expert e owns three vectors, its compressed form: `ce_gate [d]` and `ce_up [d]` scale the
inputs of its gate and up projections, `ce_hidden [f]` its hidden activation (all ones at the
start, so a fresh conversion equals dropping the lower-ranked experts). For a token whose router
picked k experts, sorted by routing weight:

  main = the first k - n experts, computed in full;
  aux  = the last n (`num_compressed`), never computed;
  a    = aux weights / their sum                               [n]
  theta = sum_j a_j * ce[aux_j]                                 (one vector of each kind)
  y    = sum_{i in main} w_i * W_down_i((act((x * theta_gate) W_gate_i) * ((x * theta_up) W_up_i))
                                         * theta_hidden)

The main experts keep their own routing weights (not renormalised), as in the reference. The
router and its balance loss see all k choices; the cost per token is that of k - n experts
plus n weighted sums of vectors.

The modulation is per token, the same for all of its main experts, so the token's three scaled
inputs travel as one row `[x * theta_gate, x * theta_up, theta_hidden]` through the dropless
machinery (the chunked loop or `ragged_dot`), whose expert function splits it again.

Select it with `MoEConfig(dispatch="compressed", dispatch_options={"num_compressed": n})`;
`jmoe.editing.compressed.compress_experts` converts a trained model.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.dispatch.chunked import chunked_expert_combine
from jmoe.dispatch.dropless import resolve_impl
from jmoe.dispatch.permute import permute, unpermute_combine
from jmoe.dispatch.sorting import sort_slots
from jmoe.experts import ExpertList, num_experts_of, stacked_experts
from jmoe.options import Options, option
from jmoe.registry import ACTIVATIONS, DISPATCHERS

IMPLS = ("auto", "xla", "ragged_dot")


@dataclasses.dataclass(frozen=True)
class CompressedOptions(Options):
    """num_compressed: n, the lowest-ranked experts of each token replaced by their vectors
      (n < top_k: at least one expert per token runs in full).
    impl: how the main experts run: "xla" (the chunked loop), "ragged_dot", or "auto" (xla
      on CPU, ragged_dot elsewhere).
    block_size: rows per chunk of the "xla" implementation."""

    num_compressed: int = option(1, ge=1)
    impl: str = option("auto", choices=IMPLS)
    block_size: int = option(512, ge=1)

    def validate(self, cfg) -> None:
        if self.num_compressed >= cfg.top_k:
            raise ValueError(f"MoEConfig.compressed.num_compressed={self.num_compressed} must be below "
                             f"top_k={cfg.top_k}: at least one expert per token is computed in full")


def expert_vectors(cfg) -> dict[str, tuple[int, ...]]:
    """The compressed form of each expert: {name: shape of one expert's vector}."""
    shapes = {"ce_up": (cfg.d_model,), "ce_hidden": (cfg.d_ff,)}
    if ACTIVATIONS.get(cfg.activation).gated:
        shapes["ce_gate"] = (cfg.d_model,)
    return shapes


def modulation(expert_params: dict, routing, cfg) -> tuple[dict, jax.Array, jax.Array, jax.Array]:
    """Split each token's slots into main and compressed ones. expert_params: stacked, at least
    the vectors (`[E, width]` each).

    Returns:
      theta: {name: [T, width]} the weighted mix of the compressed experts' vectors (ones for
        a token with no compressed slot selected),
      main_ids, main_weights [T, k - n] float32, main_mask [T, k - n].
    """
    n = cfg.dispatch_options.num_compressed
    k = routing.expert_ids.shape[1]
    w = jnp.where(routing.mask, routing.weights, 0.0).astype(jnp.float32)
    rank = jnp.argsort(-w, axis=-1, stable=True)  # slots by weight, largest first
    ids = jnp.take_along_axis(routing.expert_ids, rank, axis=-1)
    w = jnp.take_along_axis(w, rank, axis=-1)
    mask = jnp.take_along_axis(routing.mask, rank, axis=-1)
    aux_w = jnp.where(mask[:, k - n:], w[:, k - n:], 0.0)
    total = jnp.sum(aux_w, axis=-1, keepdims=True)
    a = aux_w / jnp.where(total > 0, total, 1.0)
    theta = {}
    for name in expert_vectors(cfg):
        mixed = jnp.einsum("tj,tjw->tw", a, expert_params[name][ids[:, k - n:]].astype(jnp.float32))
        theta[name] = jnp.where(total > 0, mixed, 1.0)
    return theta, ids[:, : k - n], w[:, : k - n], mask[:, : k - n]


def modulated_ffn(params: dict, rows: jax.Array, *, d: int, activation: str, dtype=None, matmul=jnp.matmul):
    """The expert FFN on rows `[x * theta_gate, x * theta_up, theta_hidden]` (the first block
    only for gated activations) -> [n, d]; `matmul` as `jmoe.experts.ffn`'s."""
    act = ACTIVATIONS.get(activation)
    dt = rows.dtype if dtype is None else jnp.dtype(dtype)
    rows = rows.astype(dt)
    cut = 2 * d if act.gated else d
    x_up, scale = rows[:, cut - d: cut], rows[:, cut:]
    up = matmul(x_up, params["w_up"].astype(dt))
    h = act.fn(matmul(rows[:, :d], params["w_gate"].astype(dt))) * up if act.gated else act.fn(up)
    return matmul(h * scale, params["w_down"].astype(dt))


def compressed_dispatch(expert_params, x, routing, cfg):
    """Main experts in full, the rest as vectors. x: [T, d] -> ([T, d], dropped=0)."""
    opts = cfg.dispatch_options
    impl = opts.impl if opts.impl != "auto" else ("xla" if resolve_impl("auto") == "xla" else "ragged_dot")
    split = isinstance(expert_params, ExpertList)
    names = expert_params.shapes if split else expert_params
    missing = [name for name in expert_vectors(cfg) if name not in names]
    if missing:
        raise ValueError(f"params['experts'] has no {missing[0]!r}: dispatch 'compressed' needs each expert's "
                         "vectors (jmoe.editing.compressed.compress_experts adds them)")
    # the serving layout (an ExpertList) runs in place in the chunked loop; only its vectors are stacked
    experts = expert_params if split and impl == "xla" else stacked_experts(expert_params)
    vectors = ({name: jnp.stack([e[name] for e in expert_params.experts]) for name in expert_vectors(cfg)}
               if split else expert_params)
    theta, ids, w, mask = modulation(vectors, routing, cfg)
    d = x.shape[-1]
    dt = x.dtype
    parts = ([x * theta["ce_gate"].astype(dt)] if "ce_gate" in theta else []) + [
        x * theta["ce_up"].astype(dt), theta["ce_hidden"].astype(dt)]
    rows = jnp.concatenate(parts, axis=-1)
    fn = partial(modulated_ffn, d=d, activation=cfg.activation, dtype=cfg.dtype)
    order, group_sizes = sort_slots(ids, mask, num_experts_of(experts))
    if impl == "xla":
        y = chunked_expert_combine(rows, jnp.where(mask, w, 0.0).reshape(-1), order, group_sizes, experts, fn,
                                   ids.shape[1], opts.block_size)
    else:
        ys = fn(experts, permute(rows, order, ids.shape[1]), matmul=partial(lax.ragged_dot, group_sizes=group_sizes))
        y = unpermute_combine(ys, order, jnp.where(mask, w, 0.0))
    return y.astype(dt if cfg.dtype is None else jnp.dtype(cfg.dtype)), jnp.zeros((), jnp.float32)


def computed_slots(routing, cfg) -> jax.Array:
    """The slots computed in full: each token's valid slots among its k - n heaviest."""
    keep = routing.expert_ids.shape[1] - cfg.dispatch_options.num_compressed
    w = jnp.where(routing.mask, routing.weights, 0.0)
    rank = jnp.argsort(-w, axis=-1, stable=True)
    return jnp.sum(jnp.take_along_axis(routing.mask, rank, axis=-1)[:, :keep])


compressed_dispatch.computed_slots = computed_slots
compressed_dispatch.expert_vectors = expert_vectors
compressed_dispatch.keep_when_serving = True
compressed_dispatch.takes_expert_list = True
DISPATCHERS.add("compressed", compressed_dispatch, options=CompressedOptions)
