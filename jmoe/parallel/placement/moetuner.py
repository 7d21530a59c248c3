"""MoETuner's placement (Go and Mahajan, 2025, "MoETuner: Optimized Mixture of Expert Serving
with Balanced Expert Placement and Token Routing"): two integer programs over routing
statistics.

1. Per layer, balanced clustering: the layer's E experts into n clusters of E / n, minimising
   sum_c |T_c - T| (T_c the load of cluster c, T the mean), the absolute values linearised
   (d_c >= T_c - T, d_c >= T - T_c); solved with scipy's `milp` (HiGHS) under a time limit,
   the heaviest expert fixed to cluster 0 (the clusters are interchangeable). The greedy
   packing (`greedy`) is the fallback and the incumbent: the better of the two is kept.
2. Clusters onto devices, layer by layer: the cluster-to-device map of layer l + 1 maximises the
   token pairs that stay on their device from layer l (a linear assignment of n clusters to n
   devices, exact; `scipy.optimize.linear_sum_assignment`).

MoETuner's second program weighs each device pair by its bandwidth and minimises the heaviest
pair; with uniform bandwidth (one node, or simulated devices) that is the total cut minimised
here. Without inter-layer pairs (load-only statistics) step 2 keeps the clusters in order.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, linear_sum_assignment, milp
from scipy.sparse import coo_matrix, vstack

from jmoe.options import Options, option
from jmoe.parallel.placement.base import NO_REPLICAS, PLACEMENTS, slots_of
from jmoe.parallel.placement.eplb import balanced_packing


@dataclasses.dataclass(frozen=True)
class MoETunerOptions(Options):
    """time_limit: seconds of the clustering program per layer (the greedy packing is kept when
    the program finds nothing better in time)."""

    time_limit: float = option(5.0, gt=0.0)


def _spread(load: np.ndarray, cluster: np.ndarray, n: int) -> float:
    T = np.bincount(cluster, weights=load, minlength=n)
    return float(np.abs(T - load.sum() / n).sum())


def balanced_clusters(load: np.ndarray, n: int, time_limit: float) -> np.ndarray:
    """[E] cluster of each expert, E / n per cluster, minimising sum_c |T_c - mean| (see above)."""
    E = len(load)
    per = E // n
    incumbent = balanced_packing(load, n)[0]
    if per == 1 or n == 1:
        return incumbent
    # variables: x[c, e] (n E binaries, index c E + e), then d[c] (n continuous)
    nx = n * E
    c = np.concatenate([np.zeros(nx), np.ones(n)])
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0
    for e in range(E):  # each expert in one cluster
        rows += [r] * n
        cols += [k * E + e for k in range(n)]
        vals += [1.0] * n
        lo.append(1.0)
        hi.append(1.0)
        r += 1
    for k in range(n):  # E / n experts per cluster
        rows += [r] * E
        cols += [k * E + e for e in range(E)]
        vals += [1.0] * E
        lo.append(per)
        hi.append(per)
        r += 1
    mean = load.sum() / n
    for k in range(n):  # d_k >= T_k - mean and d_k >= mean - T_k
        for sign in (1.0, -1.0):
            rows += [r] * (E + 1)
            cols += [k * E + e for e in range(E)] + [nx + k]
            vals += list(-sign * load) + [1.0]
            lo.append(-sign * mean)
            hi.append(np.inf)
            r += 1
    A = coo_matrix((vals, (rows, cols)), shape=(r, nx + n)).tocsr()
    lb, ub = np.zeros(nx + n), np.concatenate([np.ones(nx), np.full(n, np.inf)])
    heaviest = int(np.argmax(load))
    lb[heaviest] = 1.0  # x[0, heaviest] = 1
    integrality = np.concatenate([np.ones(nx), np.zeros(n)])
    res = milp(c, constraints=LinearConstraint(vstack([A]), lo, hi), integrality=integrality,
               bounds=Bounds(lb, ub), options={"time_limit": time_limit, "disp": False})
    if res.x is None:
        return incumbent
    x = res.x[:nx].reshape(n, E)
    found = np.argmax(x, axis=0)
    if np.bincount(found, minlength=n).tolist() != [per] * n:
        return incumbent
    return found if _spread(load, found, n) < _spread(load, incumbent, n) else incumbent


def moetuner(stats, num_devices: int, num_slots: int, opts: MoETunerOptions) -> np.ndarray:
    n, E = num_devices, stats.num_experts
    if E % n:
        raise ValueError(f"moetuner: {E} experts do not split evenly over {n} devices")
    devices = []
    for l, load in enumerate(stats.load):
        cluster = balanced_clusters(load, n, opts.time_limit)
        if l > 0 and stats.pairs is not None:
            # profit[c, g]: pairs from the previous layer's experts on device g into cluster c
            profit = np.eye(n)[cluster].T @ (stats.pairs[l - 1].T @ np.eye(n)[devices[-1]])
            rows, cols = linear_sum_assignment(profit, maximize=True)
            to_device = np.empty(n, dtype=np.int64)
            to_device[rows] = cols
            cluster = to_device[cluster]
        devices.append(cluster)
    return np.stack([slots_of(d) for d in devices])


PLACEMENTS.add("moetuner", moetuner, options=MoETunerOptions)
NO_REPLICAS.add("moetuner")
