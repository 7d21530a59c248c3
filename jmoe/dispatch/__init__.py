"""Dispatch/combine strategies, chosen by name: "dropless", "capacity", "gather" (decoding steps),
"dense" (reference), "compressed" (compressed experts)."""

from jmoe.dispatch import capacity, compressed, dropless, gather, pallas, reference  # noqa: F401  (register)
from jmoe.dispatch.capacity import capacity_assignment, expert_capacity
from jmoe.dispatch.chunked import chunked_expert_combine
from jmoe.dispatch.dropless import resolve_impl
from jmoe.dispatch.permute import permute, unpermute_combine
from jmoe.dispatch.sorting import inverse_permutation, sort_slots
from jmoe.registry import DISPATCHERS


def get_dispatch(name: str):
    """The registered dispatcher called `name` (ValueError listing the known ones otherwise)."""
    return DISPATCHERS.get(name)


__all__ = [
    "DISPATCHERS",
    "capacity_assignment",
    "chunked_expert_combine",
    "expert_capacity",
    "get_dispatch",
    "inverse_permutation",
    "permute",
    "resolve_impl",
    "sort_slots",
    "unpermute_combine",
]
