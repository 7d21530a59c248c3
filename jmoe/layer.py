"""The functional MoE layer: router + dispatch + experts + shared experts."""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from jmoe import losses
from jmoe.checks import check_key
from jmoe.config import MoEConfig
from jmoe.experts import ExpertList, expected_expert_shapes, ffn, init_experts, init_ffn
from jmoe.registry import DISPATCHERS, ROUTERS
from jmoe.routing.base import Routing
from jmoe.routing.edit import apply_edit
from jmoe.routing.skip import skip_low_weight


@struct.dataclass
class MoEAux:
    """What a layer call reports besides its output.

    Attributes:
      loss: scalar to add to the training loss: aux_loss_coef * balance_loss +
        z_loss_coef * z_loss + entropy_loss_coef * router_entropy.
      balance_loss: scalar, the configured balance loss (1 at uniform routing for "switch").
      z_loss: scalar, the router z-loss.
      load: [C] share of the selected token-slots per router choice (sums to 1).
      tokens_per_expert: [C] selected token-slots per choice, summed over every shard.
      dropped_fraction: scalar, share of FFN slots the dispatch dropped.
      router_entropy: scalar, mean entropy of the router distribution (nats).
      experts_per_token: scalar, mean number of FFN experts computed per token.
      zero_compute_fraction: scalar, share of selected slots that went to FLOP-free experts
        (null, zero, copy, constant).
      skipped_fraction: scalar, share of the router's FFN slots that online expert skipping
        dropped (`MoEConfig.skip_ratio`; 0 without it).
      routing: the `Routing` the layer used (its arrays are per token).
    """

    loss: jax.Array
    balance_loss: jax.Array
    z_loss: jax.Array
    load: jax.Array
    tokens_per_expert: jax.Array
    dropped_fraction: jax.Array
    router_entropy: jax.Array
    experts_per_token: jax.Array
    zero_compute_fraction: jax.Array
    skipped_fraction: jax.Array
    routing: Routing
    num_ffn_choices: int = struct.field(pytree_node=False, default=0)

    @property
    def ffn_load(self) -> jax.Array:
        """[E] share of the FFN slots per FFN choice (sums to 1)."""
        counts = self.tokens_per_expert[..., : self.num_ffn_choices]
        return counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)

    @property
    def max_violation(self) -> jax.Array:
        """MaxVio over the FFN experts = max load / mean load - 1."""
        return losses.max_violation(self.ffn_load)


def init_moe(key: jax.Array, cfg: MoEConfig) -> dict:
    """Parameters of one MoE layer.

    Returns:
      {"router": {...}, "experts": {"w_gate", "w_up": [E, d, f], "w_down": [E, f, d]},
      "shared": {"w_gate", "w_up": [d, S], "w_down": [S, d]}} with S = cfg.shared_d_ff;
      "shared" only when cfg.num_shared_experts > 0, "w_gate" only for gated activations.
      The router's tree depends on the router ("topk": {"w": [d, E]}).
    """
    _check_config(cfg)
    return _init_moe(check_key(key), cfg)


@partial(jax.jit, static_argnums=1)
def _init_moe(key, cfg):
    k_router, k_experts, k_shared = jax.random.split(key, 3)
    params = {
        "router": ROUTERS.get(cfg.router).init(k_router, cfg),
        "experts": init_experts(k_experts, cfg),
    }
    if cfg.num_shared_experts:
        k_shared, k_gate = jax.random.split(k_shared)
        params["shared"] = init_ffn(k_shared, cfg.d_model, cfg.shared_d_ff, cfg.activation, cfg.param_dtype)
        if cfg.shared_gate:
            w = cfg.d_model**-0.5 * jax.random.truncated_normal(k_gate, -2, 2, (cfg.d_model, 1))
            params["shared_gate"] = {"w": w.astype(cfg.param_dtype)}
    return params


def shared_output(shared: dict, gate: dict | None, x: jax.Array, cfg: MoEConfig,
                  partial_sum: Callable[[jax.Array], jax.Array] = lambda v: v) -> jax.Array:
    """The shared experts on every token, gated by sigmoid(x w_g) when there is a gate. x: [T, d].

    partial_sum completes a tensor-parallel FFN (each device holds a slice of its hidden
    width) before the gate is applied; the gate multiplies in float32.
    """
    y = partial_sum(ffn(shared, x, cfg.activation, cfg.dtype))
    if gate is not None:
        g = jax.nn.sigmoid(x.astype(jnp.float32) @ gate["w"].astype(jnp.float32))
        y = (y.astype(jnp.float32) * g).astype(y.dtype)
    return y


def init_moe_state(cfg: MoEConfig) -> Any:
    """The router's explicit non-gradient state (None for stateless routers)."""
    return ROUTERS.get(cfg.router).init_state(cfg)


def update_moe_state(state: Any, aux: MoEAux, cfg: MoEConfig) -> Any:
    """Apply the router's once-per-step state update (e.g. the aux-loss-free bias) from the
    step's counts; the identity for stateless routers."""
    update = ROUTERS.get(cfg.router).update_state
    if update is None or state is None:
        return state
    return update(state, aux.tokens_per_expert, cfg)


def _check_config(cfg):
    if not isinstance(cfg, MoEConfig):
        raise ValueError(f"cfg must be a jmoe.MoEConfig, got {type(cfg).__name__}")


def _check_params(params, cfg, rows: int | None = None):
    """ValueErrors for parameters that do not fit `cfg`; rows: the expert weights' leading size
    when it is not num_experts (experts stored in the slots of a placement)."""
    if not isinstance(params, dict) or "router" not in params or "experts" not in params:
        raise ValueError("params must be a dict with 'router' and 'experts' (from jmoe.init_moe)")
    expected = expected_expert_shapes(cfg)
    if rows is not None:
        expected = {name: (rows,) + shape[1:] for name, shape in expected.items()}
    experts = params["experts"]
    shapes = experts.shapes if isinstance(experts, ExpertList) else {n: tuple(w.shape) for n, w in experts.items()}
    for name, shape in expected.items():
        if name not in shapes:
            raise ValueError(f"params['experts'] is missing {name!r} (activation={cfg.activation!r})")
        if shapes[name] != shape:
            raise ValueError(
                f"params['experts'][{name!r}] has shape {shapes[name]}, expected {shape} for "
                + (f"{rows} slots" if rows is not None else f"num_experts={cfg.num_experts}")
                + f", d_model={cfg.d_model}, d_ff={cfg.d_ff}"
            )
    _check_router_params(params["router"], cfg)
    if cfg.num_shared_experts and "shared" not in params:
        raise ValueError("params has no 'shared' experts but cfg.num_shared_experts > 0")
    if cfg.shared_gate and cfg.num_shared_experts and "shared_gate" not in params:
        raise ValueError("params has no 'shared_gate' but cfg.shared_gate is set")


@lru_cache(maxsize=64)
def _router_shapes(cfg: MoEConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(leaf path, shape) of the router parameters `cfg`'s router initialises."""
    tree = jax.eval_shape(lambda k: ROUTERS.get(cfg.router).init(k, cfg), jax.random.key(0))
    return tuple((jax.tree_util.keystr(p), tuple(a.shape)) for p, a in jax.tree_util.tree_leaves_with_path(tree))


def _check_router_params(router, cfg: MoEConfig) -> None:
    """A ValueError naming the leaf when params['router'] lacks a parameter `cfg`'s router makes
    or holds one of another shape (a router of another width would select experts the layer
    does not have). Further leaves a checkpoint brings (e.g. DeepSeek's correction bias) pass."""
    expected = dict(_router_shapes(cfg))
    got = {jax.tree_util.keystr(p): tuple(jnp.shape(a)) for p, a in jax.tree_util.tree_leaves_with_path(router)}
    for path, shape in expected.items():
        if path not in got:
            raise ValueError(f"params['router']{path} is missing (router={cfg.router!r})")
        if got[path] != shape:
            raise ValueError(f"params['router']{path} has shape {got[path]}, expected {shape} for router={cfg.router!r}, "
                             f"num_experts={cfg.num_experts}, d_model={cfg.d_model}")


def _check_input(x, cfg):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"x must be an array, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] != cfg.d_model:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be d_model={cfg.d_model}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
    if x.size == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}: no tokens to route")


def sequence_length(shape: tuple[int, ...]) -> int:
    """Tokens per sequence of an input [..., S, d] (a 2-d [T, d] input is one sequence)."""
    return shape[-2] if len(shape) >= 3 else max(shape[0], 1) if len(shape) == 2 else 1


def moe_layer(
    params: dict,
    x: jax.Array,
    cfg: MoEConfig,
    *,
    state: Any = None,
    key: jax.Array | None = None,
    ep: Any = None,
    carry: Any = None,
    balance_counts: jax.Array | None = None,
    slots: jax.Array | None = None,
) -> tuple[jax.Array, MoEAux]:
    """Apply a sparse MoE layer.

    Args:
      params: from `init_moe(key, cfg)`.
      x: [..., d_model] floating tokens; leading dimensions are flattened into T tokens
        (and [..., S, d] inputs are S-token sequences for sequence-scoped balance losses).
      cfg: the layer's `MoEConfig`.
      state: the router's explicit state (see `init_moe_state`), if it has one.
      key: PRNG key for stochastic routing (router jitter); None for deterministic calls.
      ep: a `jmoe.parallel.ExpertParallel` to run the layer expert-parallel on its mesh.
      carry: the previous MoE layer's `aux.routing.carry` (MoE++ gating residual,
        recurrent router), or None at the first layer.
      balance_counts: [C] selected-slot counts of the whole optimizer step, for the
        global-scope balance loss under gradient accumulation.
      slots: [S] an expert placement of the layer on `ep`'s mesh (the expert of each slot,
        `jmoe.parallel.placement`); the result does not depend on it (ignored without `ep`).
        With `ep.experts_in_slots` the expert weights are stored in these slots ([S, ...]).
    Returns:
      y: [..., d_model] in the compute dtype (cfg.dtype, or x's dtype).
      aux: `MoEAux` with losses, load statistics and the `Routing`.
    """
    _check_config(cfg)
    _check_input(x, cfg)
    if key is not None:
        check_key(key)
    in_slots = ep is not None and getattr(ep, "experts_in_slots", False) and slots is not None
    _check_params(params, cfg, rows=jnp.shape(slots)[0] if in_slots else None)
    if ep is not None:
        return ep.apply(params, x, cfg, state=state, key=key, carry=carry, balance_counts=balance_counts, slots=slots)
    return _moe_layer(params, x, cfg, state, key, carry, balance_counts)


def flatten_tokens(x: jax.Array, cfg: MoEConfig) -> jax.Array:
    """[..., d] -> [T, d] in the compute dtype."""
    xt = x.reshape(-1, cfg.d_model)
    return xt if cfg.dtype is None else xt.astype(cfg.dtype)


def ffn_routing(routing: Routing, cfg: MoEConfig) -> Routing:
    """The part of `routing` a dispatch computes: FFN choices only, mapped to expert ids."""
    r = routing.for_ffn_experts(cfg.num_ffn_choices)
    if cfg.expert_map:
        r = r.replace(expert_ids=jnp.asarray(cfg.expert_map, jnp.int32)[r.expert_ids])
    return r


def layer_body(
    params: dict,
    xt: jax.Array,
    cfg: MoEConfig,
    *,
    dispatch: Callable,
    state: Any,
    key: jax.Array | None,
    carry: Any,
    balance_counts: jax.Array | None,
    seq_len: int,
    reduce: Callable[[jax.Array], jax.Array] = lambda v: v,
    shards: int = 1,
    partial_sum: Callable[[jax.Array], jax.Array] = lambda v: v,
    routing: Routing | None = None,
) -> tuple[jax.Array, MoEAux]:
    """The MoE layer on flat tokens: route, dispatch, FLOP-free experts, shared experts, aux.

    The single-device layer runs it on all tokens with a registered dispatch; the
    expert-parallel layer runs it on each token shard inside `shard_map`, with a token
    exchange as the dispatch, `reduce` summing statistics over the token shards and
    `partial_sum` completing tensor-parallel shared experts.

    Args:
      params: the layer's parameters (expert weights as the dispatch needs them).
      xt: [T, d] tokens in the compute dtype.
      dispatch: `(expert_params, x [T, d], routing, cfg) -> (y [T, d], dropped)`.
      seq_len: tokens per sequence (for sequence-scoped balance losses).
      routing: this layer's routing of xt when it is already known (the offloaded inference
        path routes first, loads the chosen experts, then runs the rest); None routes here.
    Returns:
      y: [T, d] in the compute dtype, and the `MoEAux`.
    """
    router = ROUTERS.get(cfg.router)
    skipped = jnp.zeros((), jnp.float32)
    if routing is None:
        with jax.named_scope("router"):
            routing, skipped = route(params["router"], xt, cfg, state=state, key=key, carry=carry)
    experts = params["experts"]
    if isinstance(experts, ExpertList) and not getattr(dispatch, "takes_expert_list", False):
        experts = experts.stack()
    with jax.named_scope("dispatch"):
        to_experts = ffn_routing(routing, cfg)
        y, dropped = dispatch(experts, xt, to_experts, cfg)
    # a dispatch that computes fewer FFN slots than it is given (compressed experts) says how many
    computed = dispatch.computed_slots(to_experts, cfg) if hasattr(dispatch, "computed_slots") else None
    if router.extra_output is not None:
        with jax.named_scope("flop_free_experts"):
            y = y + router.extra_output(params["router"], xt, routing, cfg).astype(y.dtype)
    if cfg.num_shared_experts:
        with jax.named_scope("shared_experts"):
            y = y + shared_output(params["shared"], params.get("shared_gate"), xt, cfg, partial_sum).astype(y.dtype)
    with jax.named_scope("aux"):
        aux = moe_aux(routing, dropped, cfg, seq_len=seq_len, reduce=reduce, shards=shards, global_counts=balance_counts,
                      skipped=skipped, computed=computed)
    return y, aux


def route(router_params: Any, xt: jax.Array, cfg: MoEConfig, *, state: Any = None, key: jax.Array | None = None,
          carry: Any = None) -> tuple[Routing, jax.Array]:
    """The layer's routing of tokens xt [T, d]: the router, then online expert skipping
    (`cfg.skip_ratio`) and the layer's routing edit (`cfg.routing_edit`). Returns (routing,
    number of FFN slots skipped)."""
    routing = ROUTERS.get(cfg.router).apply(router_params, xt, cfg, state=state, key=key, carry=carry)
    routing, skipped = skip_low_weight(routing, cfg.skip_ratio, cfg.num_ffn_choices)
    return apply_edit(routing, cfg), skipped


@partial(jax.jit, static_argnums=2)
def _moe_layer(params, x, cfg, state, key, carry, balance_counts):
    y, aux = layer_body(
        params, flatten_tokens(x, cfg), cfg, dispatch=DISPATCHERS.get(cfg.dispatch), state=state, key=key,
        carry=carry, balance_counts=balance_counts, seq_len=sequence_length(x.shape),
    )
    return y.reshape(x.shape[:-1] + (cfg.d_model,)), aux


def moe_aux(
    routing: Routing,
    dropped: jax.Array,
    cfg: MoEConfig,
    *,
    seq_len: int,
    reduce: Callable[[jax.Array], jax.Array] = lambda v: v,
    shards: int = 1,
    global_counts: jax.Array | None = None,
    skipped: jax.Array | float = 0.0,
    computed: jax.Array | None = None,
) -> MoEAux:
    """Losses and statistics of one routing; `reduce` sums over the shards of the batch.
    skipped: FFN slots online expert skipping dropped from `routing` (this shard's).
    computed: FFN slots the dispatch computed in full (this shard's; default every FFN slot)."""
    router = ROUTERS.get(cfg.router)
    E = cfg.num_ffn_choices
    C = routing.num_choices
    counts = reduce(losses.expert_counts(routing.expert_ids, routing.mask, C))
    selected = jnp.maximum(jnp.sum(counts), 1.0)
    ctx = losses.BalanceContext(seq_len=seq_len, reduce=reduce, shards=shards, global_counts=global_counts)
    balance = losses.balance_loss(
        routing, cfg, ctx, eta=router.balance_weights(cfg), count_transform=lambda c: router.balance_counts(c, cfg)
    )
    tokens = reduce(jnp.float32(routing.num_tokens))
    z = reduce(jnp.sum(jax.nn.logsumexp(routing.logits.astype(jnp.float32), axis=-1) ** 2)) / tokens
    entropy = reduce(jnp.sum(losses.token_entropy(routing.probs))) / tokens
    ffn_slots = reduce(jnp.sum(routing.ffn_mask(E)).astype(jnp.float32))
    skipped = reduce(jnp.asarray(skipped, jnp.float32))
    return MoEAux(
        loss=cfg.aux_loss_coef * balance + cfg.z_loss_coef * z + cfg.entropy_loss_coef * entropy,
        balance_loss=balance,
        z_loss=z,
        load=counts / selected,
        tokens_per_expert=counts,
        dropped_fraction=reduce(dropped) / jnp.maximum(ffn_slots, 1.0),
        router_entropy=entropy,
        experts_per_token=(ffn_slots if computed is None else reduce(jnp.asarray(computed, jnp.float32))) / tokens,
        zero_compute_fraction=(jnp.sum(counts) - ffn_slots) / selected,
        skipped_fraction=skipped / jnp.maximum(ffn_slots + skipped, 1.0),
        routing=routing,
        num_ffn_choices=E,
    )
