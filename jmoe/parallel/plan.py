"""Dry-run planning of a sharded training run: the mesh, every parameter's sharding, and the
memory each device needs, for a target topology, computed without the accelerators.

Nothing is allocated: the train state is traced with `jax.eval_shape`, the mesh is a
`jax.sharding.AbstractMesh`, and the partition rules of `jmoe.parallel.rules` give each leaf's
spec exactly as a real run on that mesh would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import numpy as np
from jax.sharding import AbstractMesh, PartitionSpec as P

from jmoe.parallel.mesh import AXES, num_token_shards, parse_mesh_spec
from jmoe.parallel.rules import DEFAULT_RULES, Rules, path_str, spec_for

GiB = 1024**3


@dataclass
class Plan:
    """What `plan_run` computed. Sizes in bytes, per device unless named total."""

    mesh: dict
    hosts: int
    devices_per_host: int
    leaves: list = field(default_factory=list)  # (path, global shape, spec, per-device shape, dtype)
    params_total: int = 0
    params_device: int = 0
    opt_device: int = 0
    grads_device: int = 0
    activations_device: int = 0
    ep_buffers_device: int = 0
    tokens_device: int = 0
    notes: list = field(default_factory=list)

    @property
    def device_total(self) -> int:
        return self.params_device + self.opt_device + self.grads_device + self.activations_device + self.ep_buffers_device

    def report(self, top: int = 12, device_memory_gib: float | None = None) -> str:
        """A human-readable plan: mesh, the largest leaves' shardings, and per-device memory."""
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [f"mesh {mesh} over {self.hosts} hosts x {self.devices_per_host} devices "
                 f"({self.hosts * self.devices_per_host} devices); {self.tokens_device:,} tokens per device per step"]
        lines.append(f"{'parameter':48} {'global shape':>20} {'spec':>28} {'per device':>18}")
        params = [l for l in self.leaves if l[0].startswith("params/")]
        for path, shape, spec, local, _ in sorted(params, key=lambda l: -math.prod(l[1]))[:top]:
            lines.append(f"{path[7:]:48} {str(shape):>20} {_spec_str(spec):>28} {str(local):>18}")
        if len(params) > top:
            lines.append(f"... and {len(params) - top} more parameters")
        rows = [("parameters", self.params_device), ("optimizer state (AdamW mu, nu)", self.opt_device),
                ("gradients", self.grads_device), ("activations (estimate, no rematerialisation)", self.activations_device),
                ("expert-parallel token buffers", self.ep_buffers_device)]
        lines.append(f"per-device memory (total parameters {self.params_total / GiB:.2f} GiB):")
        lines += [f"  {name:46} {b / GiB:9.3f} GiB" for name, b in rows]
        lines.append(f"  {'total':46} {self.device_total / GiB:9.3f} GiB")
        if device_memory_gib:
            fits = self.device_total <= device_memory_gib * GiB
            lines.append(f"  {'device memory':46} {device_memory_gib:9.3f} GiB -> {'fits' if fits else 'DOES NOT FIT'}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _spec_str(spec: P) -> str:
    return "(" + ", ".join("+".join(e) if isinstance(e, tuple) else str(e) for e in spec) + ")" if len(spec) else "replicated"


def _local(shape: tuple, spec: P, sizes: dict) -> tuple:
    out = list(shape)
    for i, entry in enumerate(spec):
        names = entry if isinstance(entry, tuple) else (entry,) if entry else ()
        out[i] //= math.prod(sizes[n] for n in names)
    return tuple(out)


def plan_run(model_cfg, tc, mesh: str | dict, *, hosts: int, devices_per_host: int,
             rules: Rules = DEFAULT_RULES, state=None) -> Plan:
    """Plan `jmoe train` of (model_cfg, tc) on `mesh` spread over hosts x devices_per_host.

    state: the run's train state as a tree of ShapeDtypeStructs ("params", "opt_state", ...),
    e.g. `jmoe.train.abstract_train_state(model_cfg, tc)`, and with an expert placement its
    experts in their slots (`jmoe.train.rebalance.held_layout`); every leaf is planned.
    Raises ValueError when the topology and the mesh disagree, or the batch or the experts do
    not divide over the mesh axes that shard them.
    """
    sizes = parse_mesh_spec(mesh)
    if hosts < 1 or devices_per_host < 1:
        raise ValueError(f"hosts={hosts} and devices_per_host={devices_per_host} must be positive")
    n = math.prod(sizes.values())
    if n != hosts * devices_per_host:
        raise ValueError(f"mesh {mesh!r} has {n} devices but the topology has {hosts} x {devices_per_host} = "
                         f"{hosts * devices_per_host}")
    names = tuple(a for a in AXES if a in sizes)
    abstract_mesh = AbstractMesh(tuple(sizes[a] for a in names), names)
    token_shards = num_token_shards(abstract_mesh)  # the token axes a real run splits batches over
    micro = tc.batch_size // tc.grad_accum
    if micro % token_shards:
        raise ValueError(f"batch_size / grad_accum = {micro} does not divide over the {token_shards} token shards "
                         f"(data x fsdp x expert) of mesh {mesh!r}")
    E = model_cfg.moe.num_experts if model_cfg.moe is not None else 0
    # the experts' rows: E, or the slots of an expert placement when the state holds them so
    rows = next((leaf.shape[0] for kp, leaf in jax.tree_util.tree_flatten_with_path(state or {})[0]
                 if path_str(kp).startswith("params/") and "/experts/" in path_str(kp)), E)
    if rows and sizes.get("expert", 1) > 1 and rows % sizes["expert"]:
        held = f" in {rows} slots" if rows != E else ""
        raise ValueError(f"num_experts={E}{held} does not divide over expert={sizes['expert']}")
    if state is None:
        raise ValueError("state=None: pass the run's abstract train state (jmoe.train.abstract_train_state(model_cfg, tc))")
    plan = Plan(mesh={a: sizes[a] for a in names}, hosts=hosts, devices_per_host=devices_per_host)
    for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not hasattr(leaf, "shape") or not leaf.shape:
            continue
        path = path_str(kp)
        spec = spec_for(path, leaf.shape, abstract_mesh, rules)
        local = _local(leaf.shape, spec, sizes)
        nbytes = math.prod(local) * np.dtype(leaf.dtype).itemsize
        plan.leaves.append((path, tuple(leaf.shape), spec, local, str(leaf.dtype)))
        if path.startswith("params/"):
            plan.params_total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
            plan.params_device += nbytes
            plan.grads_device += math.prod(local) * 4
        elif path.startswith("opt_state/"):
            plan.opt_device += nbytes
    # activations kept for the backward pass, per layer and device, in the compute dtype
    b, s, d = micro // token_shards, tc.seq_len, model_cfg.d_model
    t = b * s
    plan.tokens_device = t * tc.grad_accum
    heads = model_cfg.n_heads
    act = np.dtype(model_cfg.dtype or "float32").itemsize
    per_layer = 10 * t * d + heads * b * s * s  # norms, residual, q/k/v/o, attention probabilities
    moe = model_cfg.moe
    if moe is not None:
        k, f = moe.top_k, moe.d_ff
        per_layer_moe = k * t * (2 * d + 3 * f) + (3 * t * (moe.shared_d_ff or 0) if moe.num_shared_experts else 0)
        n_moe = len(model_cfg.moe_layers)
        dense = model_cfg.n_layers - n_moe
        plan.activations_device = act * (model_cfg.n_layers * per_layer + n_moe * per_layer_moe + dense * 3 * t * model_cfg.d_ff)
        n_ep = sizes.get("expert", 1)
        if n_ep > 1:
            if moe.dispatch == "capacity":
                cf = moe.dispatch_options.capacity_factor
                cap = int(math.ceil(cf * t * k / n_ep))
                sizing = f"capacity factor {cf}"
            else:  # dropless: a device may receive every slot of every shard
                cap = t * k
                sizing = "dropless (every slot may go to one device)"
            plan.ep_buffers_device = act * 2 * n_ep * cap * d * n_moe  # send + receive per MoE layer, kept for backward
            plan.notes.append(f"expert-parallel buffers sized for the padded exchange, {sizing}")
    else:
        plan.activations_device = act * model_cfg.n_layers * (per_layer + 3 * t * model_cfg.d_ff)
    plan.activations_device += 4 * t * model_cfg.vocab_size * 2  # logits and their gradient
    plan.notes.append(f"activation memory is an estimate ({np.dtype(model_cfg.dtype or 'float32').name}, nothing rematerialised); XLA's fusion and "
                      "buffer reuse usually bring the real peak below it")
    return plan
