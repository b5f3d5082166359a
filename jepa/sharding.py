"""The device mesh and how arrays are laid out on it.

Named axes as in MaxText: `data` (pure data parallelism), `fsdp` (data parallelism whose parameters and
optimiser state are sharded too) and `tensor` (attention heads / MLP hidden units). The batch is split
over data x fsdp; every process feeds its own slice and the global array is assembled without copies.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); one -1 takes the devices left over."""
    sizes = [int(mesh_cfg[a]) for a in AXES]
    shown = dict(zip(AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {shown}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh: sizes must be positive or -1, got {shown}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"config.mesh: {shown} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh: {shown} needs {math.prod(sizes)} devices, "
                         f"{num_devices} are present")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: the compiler propagates shardings from the annotations (GSPMD style).
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Each process's slice of the batch -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """Train-state layout: replicated for now (every parameter on every device)."""
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
