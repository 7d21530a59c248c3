"""Expert placement: experts (and their replicas) on devices, and the algorithms that choose
it from routing statistics (`jmoe.parallel.placement.base`)."""

from jmoe.parallel.placement.base import (
    NEEDS_PAIRS,
    NO_REPLICAS,
    PLACEMENTS,
    ExpertPlacement,
    PlacementStats,
    device_load,
    excess_load,
    measures,
    place,
    traffic,
)
from jmoe.parallel.placement import eplb, exflow, moetuner, simple  # noqa: F401,E402  (fill the registry)

__all__ = ["NEEDS_PAIRS", "NO_REPLICAS", "PLACEMENTS", "ExpertPlacement", "PlacementStats", "device_load", "excess_load",
           "measures", "place", "traffic"]
