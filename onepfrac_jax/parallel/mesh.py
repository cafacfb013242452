"""One mesh for every stage: all devices of all processes on a single `data` axis."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from onepfrac_jax.config import host_memory_bytes

DATA = "data"


def make_data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process), axis name `data`."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), (DATA,), axis_types=(AxisType.Auto,), devices=devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over `data`: batches, and the fractal class bank."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def device_memory_bytes(mesh: Mesh) -> int:
    """The memory each device of `mesh` may fill: the least `bytes_limit` of this process's devices, or where they
    report none (CPUs) this host's memory shared among them."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in local]
    if all(limits):
        return min(limits)
    return host_memory_bytes() // len(local)


def to_host(array: jax.Array) -> np.ndarray:
    """The whole array on this host: a plain copy when this process holds all of it, else gathered from every
    process (a collective: all processes must call it)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
