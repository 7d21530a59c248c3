"""ExFlow's affinity placement (Yao et al., 2024, "Exploiting Inter-Layer Expert Affinity for
Accelerating Mixture-of-Experts Model Inference"; YJHMITWEB/ExFlow).

With every device holding the context of every token (context-coherent expert parallelism), a
token stays on the device of its expert, and it crosses devices only when its expert at the
next MoE layer lives elsewhere. ExFlow places experts to minimise those crossings, the cut of
the layered graph whose edge (a at layer l, b at layer l + 1) weighs the tokens that go from a
to b (`PlacementStats.pairs`), under exactly E / n experts of every layer on every device.

ExFlow solves that as one integer program with Gurobi (recursive bisection for many devices).
Here each layer's placement given its neighbours' is an exact linear assignment (experts to
device slots, profit = the pairs kept on the device, `scipy.optimize.linear_sum_assignment`):
a forward pass places layer 0 as the default layout and each next layer against the previous
one, then sweeps re-place every layer against both neighbours until the cut stops falling.
Every step keeps the constraint exact and never raises the cut.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import linear_sum_assignment

from jmoe.options import Options, option
from jmoe.parallel.placement.base import NEEDS_PAIRS, NO_REPLICAS, PLACEMENTS, slots_of


@dataclasses.dataclass(frozen=True)
class ExFlowOptions(Options):
    """sweeps: most refinement sweeps over the layers after the forward pass."""

    sweeps: int = option(8, ge=0)


def assign(profit: np.ndarray, per_device: int) -> np.ndarray:
    """profit [E, n] of each expert on each device -> [E] device, `per_device` experts on each,
    maximising the total profit (exact)."""
    E, n = profit.shape
    rows, cols = linear_sum_assignment(np.repeat(profit, per_device, axis=1), maximize=True)
    device = np.empty(E, dtype=np.int64)
    device[rows] = cols // per_device
    return device


def kept(pairs: np.ndarray, dev_a: np.ndarray, dev_b: np.ndarray) -> float:
    """Pairs [E, E] whose two experts are on the same device."""
    return float(pairs[dev_a[:, None] == dev_b[None, :]].sum())


def affinity_devices(pairs: np.ndarray, num_devices: int, sweeps: int, first: np.ndarray | None = None) -> np.ndarray:
    """pairs [L - 1, E, E] -> [L, E] device of each expert (E / n per device and layer)."""
    L, E = pairs.shape[0] + 1, pairs.shape[1]
    per = E // num_devices
    onehot = lambda dev: np.eye(num_devices)[dev]  # noqa: E731  [E, n]
    dev = np.zeros((L, E), dtype=np.int64)
    dev[0] = np.arange(E) // per if first is None else first
    for l in range(1, L):  # forward pass
        dev[l] = assign(pairs[l - 1].T @ onehot(dev[l - 1]), per)
    cut = lambda: -sum(kept(pairs[l], dev[l], dev[l + 1]) for l in range(L - 1))  # noqa: E731
    best = cut()
    for _ in range(sweeps):
        for l in range(L):
            profit = np.zeros((E, num_devices))
            if l > 0:
                profit += pairs[l - 1].T @ onehot(dev[l - 1])
            if l < L - 1:
                profit += pairs[l] @ onehot(dev[l + 1])
            dev[l] = assign(profit, per)
        now = cut()
        if now >= best - 1e-9:
            break
        best = now
    return dev


def exflow(stats, num_devices: int, num_slots: int, opts: ExFlowOptions) -> np.ndarray:
    if stats.num_experts % num_devices:
        raise ValueError(f"exflow: {stats.num_experts} experts do not split evenly over {num_devices} devices")
    if stats.num_layers == 1:
        return np.arange(stats.num_experts)[None]
    return np.stack([slots_of(d) for d in affinity_devices(stats.pairs, num_devices, opts.sweeps)])


PLACEMENTS.add("exflow", exflow, options=ExFlowOptions)
NO_REPLICAS.add("exflow")
NEEDS_PAIRS.add("exflow")
