"""EPLB: DeepSeek's expert-parallel load balancer (deepseek-ai/EPLB, `eplb.py`, MIT), in NumPy.

Redundant slots go to the hottest experts (each extra slot to the expert with the largest load
per copy), then the copies are packed onto devices, the heaviest first into the lightest device
that still has a free slot (every device gets the same number of slots). The hierarchical
policy first packs groups of experts onto nodes (with `num_groups` groups, as DeepSeek-V3's
group-limited routing has), then replicates within each node and packs onto the node's devices,
so that copies never leave their node; with one group and one node it is the global policy.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jmoe.options import Options, option
from jmoe.parallel.placement.base import PLACEMENTS


@dataclasses.dataclass(frozen=True)
class EPLBOptions(Options):
    """num_groups: expert groups packed onto nodes as wholes (1: the global policy);
    num_nodes: nodes of the devices (devices per node = devices / nodes)."""

    num_groups: int = option(1, ge=1)
    num_nodes: int = option(1, ge=1)


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Items [m] into `num_packs` packs of m / num_packs items each: heaviest first, each into the
    lightest pack that is not full (ties: the lowest pack). Returns (pack [m], rank in pack [m])."""
    m = len(weight)
    per = m // num_packs
    if per == 1:
        return np.arange(m), np.zeros(m, dtype=np.int64)
    pack, rank = np.zeros(m, dtype=np.int64), np.zeros(m, dtype=np.int64)
    weights, counts = np.zeros(num_packs), np.zeros(num_packs, dtype=np.int64)
    for i in np.argsort(-np.asarray(weight, dtype=np.float64), kind="stable"):
        open_packs = np.flatnonzero(counts < per)
        p = open_packs[np.argmin(weights[open_packs])]
        pack[i], rank[i] = p, counts[p]
        weights[p] += weight[i]
        counts[p] += 1
    return pack, rank


def replicate(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`num_phy` >= m slots for m experts: one each, every extra slot to the expert of largest
    load per copy. Returns (expert of each slot [num_phy], copy index [num_phy], copies [m])."""
    m = len(weight)
    phy2log = np.concatenate([np.arange(m), np.zeros(num_phy - m, dtype=np.int64)])
    rank = np.zeros(num_phy, dtype=np.int64)
    count = np.ones(m, dtype=np.int64)
    w = np.asarray(weight, dtype=np.float64)
    for i in range(m, num_phy):
        e = int(np.argmax(w / count))
        phy2log[i], rank[i] = e, count[e]
        count[e] += 1
    return phy2log, rank, count


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return inv


def hierarchical(weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_devices: int) -> np.ndarray:
    """One layer: loads [E] -> the expert of each of `num_phy` slots, device-major."""
    E = len(weight)
    group_size, groups_per_node = E // num_groups, num_groups // num_nodes
    phy_per_node, devices_per_node = num_phy // num_nodes, num_devices // num_nodes
    # 1. groups onto nodes; experts renumbered node-major ("mlog")
    group_pack, group_rank = balanced_packing(weight.reshape(num_groups, group_size).sum(-1), num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[:, None] + np.arange(group_size)).reshape(-1)
    mlog2log = _inverse(log2mlog)
    per_node = weight[mlog2log].reshape(num_nodes, E // num_nodes)
    out = []
    for node in range(num_nodes):
        # 2. replicas within the node
        phy2mlog, _, count = replicate(per_node[node], phy_per_node)
        # 3. copies onto the node's devices
        pack, rank = balanced_packing(per_node[node][phy2mlog] / count[phy2mlog], devices_per_node)
        pphy2phy = _inverse(pack * (phy_per_node // devices_per_node) + rank)
        out.append(phy2mlog[pphy2phy] + node * (E // num_nodes))
    return mlog2log[np.concatenate(out)]


def eplb(stats, num_devices: int, num_slots: int, opts: EPLBOptions) -> np.ndarray:
    E = stats.num_experts
    g, nodes = opts.num_groups, opts.num_nodes
    if E % g or g % nodes or num_devices % nodes or num_slots % num_devices:
        raise ValueError(f"eplb: {E} experts in num_groups={g} groups over num_nodes={nodes} nodes of {num_devices} "
                         f"devices with {num_slots} slots needs E % groups == groups % nodes == devices % nodes == 0")
    return np.stack([hierarchical(w, num_slots, g, nodes, num_devices) for w in stats.load])


PLACEMENTS.add("eplb", eplb, options=EPLBOptions)
