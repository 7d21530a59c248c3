"""Device meshes from a spec string such as "data=2,expert=4".

Axes, in mesh order:
  data    data parallelism (tokens split, parameters replicated)
  fsdp    data parallelism with parameters sharded (gathered where used)
  expert  expert parallelism; it is also a data axis for tokens
  model   tensor parallelism of the FFNs' hidden dimension (tokens replicated)
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "expert", "model")
TOKEN_AXES = ("data", "fsdp", "expert")


def parse_mesh_spec(spec: str | dict) -> dict[str, int]:
    """"data=2,expert=4" -> {"data": 2, "expert": 4} (ValueError naming the bad part)."""
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).replace(" ", "").split(","):
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"mesh spec {spec!r}: {part!r} must look like axis=size")
            name, size = part.split("=", 1)
            try:
                items.append((name, int(size)))
            except ValueError:
                raise ValueError(f"mesh spec {spec!r}: size {size!r} of axis {name!r} is not an integer") from None
    out: dict[str, int] = {}
    for name, size in items:
        if name not in AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; known: {', '.join(AXES)}")
        if name in out:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} appears twice")
        if size < 1:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} has size {size}")
        out[name] = size
    if not out:
        raise ValueError(f"mesh spec {spec!r} names no axes")
    return out


def make_mesh(spec: str | dict, devices=None) -> Mesh:
    """A mesh over `devices` (default: all devices of all processes) with axes in AXES order.

    The product of the sizes must equal the number of devices.
    """
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(a for a in AXES if a in sizes)
    shape = tuple(sizes[a] for a in names)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh {spec!r} needs {math.prod(shape)} devices but {len(devices)} are available"
            + (" (on CPU, simulate more with `jmoe train --cpu-devices N`)" if devices[0].platform == "cpu" else "")
        )
    try:
        return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)
    except Exception:  # topology-aware placement can refuse unusual shapes; fall back to plain order
        return Mesh(np.asarray(devices).reshape(shape), names, axis_types=(AxisType.Auto,) * len(names))


def axis_size(mesh: Mesh, name: str) -> int:
    """Size of axis `name` of `mesh` (1 if the mesh lacks it)."""
    return mesh.shape.get(name, 1)


def token_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that split tokens (data, fsdp, expert), in mesh order."""
    return tuple(a for a in mesh.axis_names if a in TOKEN_AXES)


def num_token_shards(mesh: Mesh) -> int:
    """Number of pieces tokens are split into: the product of the token axes' sizes."""
    return math.prod(axis_size(mesh, a) for a in token_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches [B, ...] split on their first dimension over the token axes."""
    return NamedSharding(mesh, P(token_axes(mesh) or None))


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that replicates an array on every device of `mesh`."""
    return NamedSharding(mesh, P())


def describe(mesh: Mesh) -> str:
    """The mesh as text, e.g. "data=2 x expert=4 (8 devices)"."""
    return " x ".join(f"{n}={s}" for n, s in mesh.shape.items()) + f" ({mesh.size} devices)"
