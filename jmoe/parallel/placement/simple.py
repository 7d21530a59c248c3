"""The two placements without a solver: `round_robin`, the default expert-parallel layout
(device g holds experts g*E/n .. (g+1)*E/n - 1; what every expert-parallel run uses without a
placement), and `greedy`, each layer's experts packed onto devices by load alone, heaviest
first into the lightest device with a free slot (longest-processing-time packing, E/n each)."""

from __future__ import annotations

import numpy as np

from jmoe.parallel.placement.base import NO_REPLICAS, PLACEMENTS, slots_of
from jmoe.parallel.placement.eplb import balanced_packing


def round_robin(stats, num_devices: int, num_slots: int, opts) -> np.ndarray:
    return np.tile(np.arange(stats.num_experts), (stats.num_layers, 1))


def greedy(stats, num_devices: int, num_slots: int, opts) -> np.ndarray:
    return np.stack([slots_of(balanced_packing(w, num_devices)[0]) for w in stats.load])


PLACEMENTS.add("round_robin", round_robin)
PLACEMENTS.add("greedy", greedy)
NO_REPLICAS.update({"round_robin", "greedy"})
