"""Expert placement in training: a run's MoE layers on a placement of the mesh's expert axis,
re-placed every `TrainConfig.rebalance_every` steps from the loads of the steps since the last
re-placement (`jmoe train --placement FILE | --rebalance-every N`).

The placement lives in the router state, as data the jitted step reads:

  "placement/<layer>"       [S] int32  the expert of each slot (`jmoe.parallel.placement`)
  "placement_load/<layer>"  [E] f32    token-slots per expert since the last re-placement
                                       (rebalancing runs only; summed inside the step)

so a re-placement is a new value of the same shape (no recompilation), and checkpoints keep
both, which makes a resumed run re-place exactly as an uninterrupted one.

The expert weights and their optimizer state (every leaf under "layers/<i>/moe/experts/" of
"params" and "opt_state") are held in their slots, [S, ...] sharded over the expert axis, a
replicated expert's copies equal (`ExpertParallel(experts_in_slots=True)`): a step moves only
tokens, and the copies' gradients are summed between them, so each copy takes the same update.
A re-placement moves the rows into their new slots (`moved`, weights and Adam moments), the
gradient-norm clip counts each expert once (`copy_weights`), and checkpoints are written per
expert (`to_experts`, the first copy of each) and put back into the slots on restore
(`to_slots`), so a checkpoint reads like any other run's and the run's numbers do not depend
on the placement.
"""

from __future__ import annotations

import re

import numpy as np

from jmoe.nn.transformer import LMConfig
from jmoe.train.config import TrainConfig

SLOTS, LOAD = "placement/", "placement_load/"
_EXPERTS = re.compile(r"(^|/)layers/(\d+)/moe/experts/")


def uses_placement(tc: TrainConfig) -> bool:
    return tc.placement is not None or tc.rebalance_every > 0


def expert_devices(tc: TrainConfig) -> int:
    from jmoe.parallel.mesh import parse_mesh_spec

    return parse_mesh_spec(tc.mesh).get("expert", 1) if tc.mesh else 1


def check(model_cfg: LMConfig, tc: TrainConfig):
    """The run's starting `ExpertPlacement` (None without one); ValueErrors naming the flag for
    settings that cannot run, found before anything is written."""
    from jmoe.parallel.placement import NO_REPLICAS, PLACEMENTS, ExpertPlacement, PlacementStats, place

    if tc.redundant_experts and not tc.rebalance_every:
        raise ValueError("--redundant-experts needs --rebalance-every (a --placement file holds its own replicas)")
    if not uses_placement(tc):
        return None
    flag = "--placement" if tc.placement is not None else "--rebalance-every"
    n = expert_devices(tc)
    if n < 2:
        raise ValueError(f"{flag} needs a mesh with an expert axis of 2 or more devices (--mesh ...,expert=N)")
    if not model_cfg.moe_layers:
        raise ValueError(f"{flag}: the model has no MoE layers to place")
    sizes = {model_cfg.moe_for(i).num_experts for i in model_cfg.moe_layers}
    if len(sizes) > 1:
        raise ValueError(f"{flag}: the MoE layers have different numbers of experts ({sorted(sizes)})")
    E = sizes.pop()
    layers = tuple(model_cfg.moe_layers)
    if tc.rebalance_every:
        PLACEMENTS.get(tc.rebalance_method)
        if tc.rebalance_method in NO_REPLICAS and tc.redundant_experts:
            raise ValueError(f"--rebalance-method {tc.rebalance_method} places one copy of each expert: it takes no "
                             f"redundant experts (got {tc.redundant_experts})")
        if (E + tc.redundant_experts) % n:
            raise ValueError(f"{E} experts + {tc.redundant_experts} redundant slots do not split evenly over the "
                             f"mesh's {n} expert devices")
    if tc.placement is not None:
        try:
            placement = ExpertPlacement.load(tc.placement)
            placement.check_fits(n)
            placement.check_model(E, layers)
        except ValueError as e:
            raise ValueError(f"--placement: {e}") from None
        if tc.rebalance_every and placement.num_slots != E + tc.redundant_experts:
            raise ValueError(f"--placement has {placement.num_slots} slots per layer; --rebalance-every with "
                             f"{tc.redundant_experts} redundant experts re-places into {E + tc.redundant_experts}")
        return placement
    # rebalancing from the default layout: the redundant slots start as copies of uniform load
    stats = PlacementStats(np.ones((len(layers), E)), layers=layers)
    return place(stats, "eplb" if tc.redundant_experts else "round_robin", n, E + tc.redundant_experts)


def initial_state(model_cfg: LMConfig, tc: TrainConfig) -> dict:
    """The placement entries of a fresh run's router state ({} without a placement)."""
    import jax.numpy as jnp

    placement = check(model_cfg, tc)
    if placement is None:
        return {}
    E = placement.num_experts
    out = {}
    for row, layer in zip(placement.slots, model_cfg.moe_layers):
        out[f"{SLOTS}{layer}"] = jnp.asarray(row, jnp.int32)
        if tc.rebalance_every:
            out[f"{LOAD}{layer}"] = jnp.zeros((E,), jnp.float32)
    return out


def rebalanced(router_state: dict, model_cfg: LMConfig, tc: TrainConfig) -> tuple[dict, dict, dict]:
    """(the router state re-placed from its accumulated loads, with the loads reset; the record
    of the re-placement: method, excess load of the old and the new placement on those loads;
    {layer: [S] the old slot each new slot's row comes from} for `moved`)."""
    import jax
    import jax.numpy as jnp

    from jmoe.parallel.placement import ExpertPlacement, PlacementStats, excess_load, place

    layers = tuple(model_cfg.moe_layers)
    host = jax.device_get({k: v for k, v in router_state.items() if k.startswith((SLOTS, LOAD))})
    load = np.stack([host[f"{LOAD}{i}"] for i in layers]).astype(np.float64)
    old_slots = np.stack([host[f"{SLOTS}{i}"] for i in layers])
    n = expert_devices(tc)
    old = ExpertPlacement(slots=old_slots, num_experts=load.shape[1], num_devices=n, layers=layers)
    new = place(PlacementStats(load, layers=layers), tc.rebalance_method, n, old.num_slots)
    out = dict(router_state)
    for row, i in zip(new.slots, layers):
        for key, value in ((f"{SLOTS}{i}", jnp.asarray(row, jnp.int32)),
                           (f"{LOAD}{i}", jnp.zeros(load.shape[1], jnp.float32))):
            out[key] = jax.device_put(value, router_state[key].sharding)
    record = {"method": tc.rebalance_method, "excess_load_before": float(excess_load(old, load).mean()),
              "excess_load_after": float(excess_load(new, load).mean())}
    sources = {i: move_sources(o, n_) for i, o, n_ in zip(layers, old.slots, new.slots)}
    return out, record, sources


def re_placed(state: dict, model_cfg: LMConfig, tc: TrainConfig, move=None) -> tuple[dict, dict]:
    """(the train state re-placed from its accumulated loads, its expert rows moved into the new
    slots; the record of the re-placement, `rebalanced`'s). move: `moved`, jitted with the
    state's shardings (default: `moved` itself)."""
    router_state, record, sources = rebalanced(state["router_state"], model_cfg, tc)
    return (move or moved)(dict(state, router_state=router_state), sources), record


# ------------------------------------------------------------------------- experts in their slots


def _map_experts(state: dict, fn) -> dict:
    """`state` with fn(layer, leaf) applied to every expert leaf of "params" and "opt_state"."""
    import jax

    from jmoe.parallel.rules import path_str

    def f(path, leaf):
        m = _EXPERTS.search(path_str(path))
        return fn(int(m.group(2)), leaf) if m and getattr(leaf, "ndim", 0) else leaf

    out = dict(state)
    for part in ("params", "opt_state"):
        if part in state:
            out[part] = jax.tree_util.tree_map_with_path(f, state[part])
    return out


def _slots_of(state: dict) -> dict:
    """{layer: [S] slots} from the state's router state ({} without a placement)."""
    rs = state.get("router_state") or {}
    return {int(k[len(SLOTS):]): v for k, v in rs.items() if k.startswith(SLOTS)}


def to_slots(state: dict) -> dict:
    """A train state with its expert leaves per expert ([E, ...]) -> in their slots ([S, ...],
    each slot a copy of its expert's row). Unchanged without a placement."""
    import jax.numpy as jnp

    slots = _slots_of(state)
    return _map_experts(state, lambda i, w: jnp.take(w, slots[i], axis=0)) if slots else state


def to_experts(state: dict, model_cfg: LMConfig) -> dict:
    """The inverse of `to_slots`: expert leaves in their slots -> per expert, from the first copy
    of each expert (the copies are equal). Unchanged without a placement."""
    import jax.numpy as jnp

    slots = _slots_of(state)
    if not slots:
        return state
    first = {i: jnp.argmax(s[None, :] == jnp.arange(model_cfg.moe_for(i).num_experts)[:, None], axis=1)
             for i, s in slots.items()}
    return _map_experts(state, lambda i, w: jnp.take(w, first[i], axis=0))


def held_layout(abstract: dict, tc: TrainConfig) -> dict:
    """The shapes of the train state a run holds in memory: `abstract` (a checkpoint's, per
    expert) with the expert leaves in their slots when the run has a placement."""
    import jax

    return jax.eval_shape(to_slots, abstract) if uses_placement(tc) else abstract


def copy_weights(params: dict, router_state: dict):
    """A tree like `params` of the weights that make a sum of squares over the slots count each
    expert once: 1 / (copies of the slot's expert) on the expert leaves' rows ([S, 1, ...]), 1
    elsewhere."""
    import jax
    import jax.numpy as jnp

    from jmoe.parallel.rules import path_str

    slots = _slots_of({"router_state": router_state})

    def weight(path, w):
        m = _EXPERTS.search(path_str(path))
        if not (m and w.ndim and slots):
            return jnp.ones((), jnp.float32)
        s = slots[int(m.group(2))]
        copies = jnp.bincount(s, length=s.shape[0])[s]
        return (1.0 / copies).reshape((-1,) + (1,) * (w.ndim - 1))

    return jax.tree_util.tree_map_with_path(weight, params)


def move_sources(old_slots: np.ndarray, new_slots: np.ndarray) -> np.ndarray:
    """[S] for each new slot, the old slot its row comes from (the first old copy of its expert)."""
    first = {}
    for j, e in enumerate(old_slots.tolist()):
        first.setdefault(e, j)
    return np.asarray([first[e] for e in new_slots.tolist()], np.int32)


def moved(state: dict, sources: dict) -> dict:
    """`state` with every expert leaf's rows gathered from their old slots: sources {layer: [S]
    old slot of each new slot} (`move_sources`)."""
    import jax.numpy as jnp

    return _map_experts(state, lambda i, w: jnp.take(w, sources[i], axis=0))
