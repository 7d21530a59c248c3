"""Multi-process start-up and host <-> global array helpers."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding


def set_cpu_device_count(n: int) -> None:
    """Simulate `n` CPU devices in this process. Must run before JAX initialises its backends."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Join a multi-process run (`jax.distributed.initialize`).

    With no arguments JAX reads the cluster from its environment (TPU pods, SLURM, Open MPI,
    ...). CPU processes exchange collectives through gloo.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator is not None:
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)


def is_primary() -> bool:
    """Whether this is process 0 of the run."""
    return jax.process_index() == 0


def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full (each keeps its shards)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(tree):
    """Fetch replicated (or single-device) arrays to numpy, in multi-process runs too."""

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_shards[0].data)
        return np.asarray(x)

    return jax.tree.map(fetch, tree)
