"""The device mesh, how the train state and the batch are laid out on it, and the multi-process runtime.

Named axes as in MaxText: `data` (pure data parallelism), `fsdp` (data parallelism whose parameters, EMA
parameters and optimiser state are sharded too) and `tensor` (attention heads / MLP hidden units). The batch is
split over data x fsdp; every process feeds its own slice and the global array is assembled without copies.

Parameter layout comes from logical rules keyed by parameter path names (the models carry no sharding
annotations, so the model code stays mesh-agnostic): each rule gives one logical axis name per dimension,
`LOGICAL_TO_MESH` maps logical names to mesh axes. The scanned blocks stack parameters as [depth, ...]:

    blocks/qkv_kernel  [depth, width, 3*width]   ("layers", "embed", "heads")   heads -> tensor, embed -> fsdp
    blocks/proj_kernel [depth, width, width]     ("layers", "heads", "embed")
    blocks/fc1_kernel  [depth, width, mlp]       ("layers", "embed", "mlp")     mlp -> tensor
    blocks/fc2_kernel  [depth, mlp, width]       ("layers", "mlp", "embed")
    blocks/qkv_bias, blocks/fc1_bias             ("layers", "heads"|"mlp")
    patch_kernel [t, p, p, C, width], mask_tokens [n, width], predictor embed/proj kernels: "embed" on a width dim

Optimiser moments (Adam mu/nu) and the EMA parameters end in the same path names, so they follow their parameter.
A mesh axis is only used on a dimension it divides; when the rule's fsdp dimension is not divisible, the largest
other free dimension that is divisible takes fsdp, otherwise the array stays replicated over fsdp. Unmatched
arrays with >= 2 dims get fsdp on their largest divisible dim; scalars and small vectors are replicated.
With fsdp > 1, `state_shardings` asserts that every array above `MIN_SHARDED_SIZE` elements is sharded.

Activations follow `ACTIVATION_RULES`: the models call `constrain_activations` on the residual stream at every
block boundary, which pins its batch dimension to data x fsdp when a mesh is active at trace time (the trainer
traces its step under `traced_under(mesh, fn)`) and does nothing otherwise. Without it GSPMD carries the
parameters' `embed` -> fsdp sharding into the residual stream's hidden dimension and all-reduces activations
(tensor parallelism over fsdp) instead of all-gathering weights: 24x the modelled traffic for the tiny config
on a (1, 8, 1) mesh.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DISTRIBUTED_MODES = ("auto", "on", "off")  # config.distributed.mode (see initialize_distributed)

# Logical dimension name -> mesh axis (None: never sharded).
LOGICAL_TO_MESH = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "layers": None, "vocab": None}

# Logical activation dimension -> mesh axes. The residual stream's hidden dimension ("embed") stays whole on every
# device: the weights are all-gathered for each block (FSDP), so only the batch is split.
ACTIVATION_RULES: dict[str, tuple[str, ...]] = {"batch": BATCH_AXES, "length": (), "embed": (),
                                                "heads": ("tensor",), "mlp": ("tensor",)}

# (regex on the "/"-joined parameter path, logical axis per dimension). First match wins; the rank must agree.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)blocks/qkv_kernel$", ("layers", "embed", "heads")),
    (r"(^|/)blocks/qkv_bias$", ("layers", "heads")),
    (r"(^|/)blocks/proj_kernel$", ("layers", "heads", "embed")),
    (r"(^|/)blocks/fc1_kernel$", ("layers", "embed", "mlp")),
    (r"(^|/)blocks/fc1_bias$", ("layers", "mlp")),
    (r"(^|/)blocks/fc2_kernel$", ("layers", "mlp", "embed")),
    (r"(^|/)blocks/[^/]*(_bias|_scale)$", ("layers", None)),
    (r"(^|/)patch_kernel$", (None, None, None, None, "embed")),
    (r"(^|/)predictor/embed_kernel$", ("embed", None)),   # [encoder width, predictor width]
    (r"(^|/)predictor/proj_kernel$", (None, "embed")),    # [predictor width, encoder width]
    (r"(^|/)mask_tokens$", (None, "embed")),
    (r"(_bias|_scale)$", (None,)),
)

# With fsdp > 1, arrays with at least this many elements must be sharded (state_shardings raises otherwise).
MIN_SHARDED_SIZE = 2 ** 14


# ---------------------------------------------------------------- mesh


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


# ---------------------------------------------------------------- activations


def traced_under(mesh: Mesh, fn):
    """`fn` run with `mesh` as JAX's abstract mesh, so that `constrain_activations` sees the mesh while `jax.jit`
    traces it (the abstract mesh, unlike `jax.set_mesh`, may be entered inside a trace)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return wrapped


def activation_spec(shape: tuple[int, ...], logical: tuple[str | None, ...], mesh_sizes: dict[str, int]) -> P:
    """PartitionSpec of an activation from its logical dimension names (ACTIVATION_RULES): each dimension takes
    the longest prefix of its mesh axes (those the mesh has) whose sizes multiply to a divisor of it."""
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {logical} do not match the activation's rank {len(shape)} (shape {shape})")
    unknown = [name for name in logical if name is not None and name not in ACTIVATION_RULES]
    if unknown:
        raise ValueError(f"unknown logical activation axes {unknown}; known: {', '.join(ACTIVATION_RULES)}")
    spec = []
    for dim, name in zip(shape, logical, strict=True):
        axes = [a for a in ACTIVATION_RULES[name] if a in mesh_sizes] if name else []
        while axes and dim % math.prod(mesh_sizes[a] for a in axes):
            axes.pop()
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return P(*spec)


def constrain_activations(x: jax.Array, logical: tuple[str | None, ...] = ("batch", "length", "embed")) -> jax.Array:
    """x laid out by its logical dimension names (`activation_spec`) on the abstract mesh of the trace; x itself
    when there is none or it has one device (single-device programs stay exactly as written)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(tuple(x.shape), tuple(logical), dict(mesh.shape)))


# ---------------------------------------------------------------- parameter rules


def path_name(path) -> str:
    """A pytree key path -> "a/b/c" (dict keys, attribute names and sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def logical_axes(name: str, shape: tuple[int, ...]) -> tuple[str | None, ...] | None:
    """The logical axis names of the first rule matching `name` with the array's rank, or None."""
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, name) and len(axes) == len(shape):
            return axes
    return None


def spec_for(name: str, shape: tuple[int, ...], mesh_sizes: dict[str, int]) -> P:
    """PartitionSpec of one state array (see the module docstring for the rules)."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        return P()
    axes = logical_axes(name, shape)
    spec: list[str | None] = [None] * len(shape)
    fsdp_dim = None
    if axes is not None:
        for i, logical in enumerate(axes):
            mesh_axis = LOGICAL_TO_MESH.get(logical) if logical else None
            if mesh_axis is None:
                continue
            if mesh_axis == "fsdp":
                fsdp_dim = i if fsdp_dim is None else fsdp_dim
            elif shape[i] % mesh_sizes.get(mesh_axis, 1) == 0:
                spec[i] = mesh_axis
    fsdp = mesh_sizes.get("fsdp", 1)
    wants_fsdp = fsdp_dim is not None or (axes is None and len(shape) >= 2)
    if fsdp > 1 and wants_fsdp:
        if fsdp_dim is not None and shape[fsdp_dim] % fsdp == 0 and spec[fsdp_dim] is None:
            spec[fsdp_dim] = "fsdp"
        else:
            # The rule's dim does not divide (or no rule): the largest free divisible dim, never the depth axis.
            layer_dims = {i for i, a in enumerate(axes or ()) if a == "layers"}
            free = [i for i in range(len(shape)) if spec[i] is None and i not in layer_dims
                    and shape[i] % fsdp == 0 and shape[i] > 1]
            if free:
                spec[max(free, key=lambda i: shape[i])] = "fsdp"
    return P(*spec)


def state_specs(abstract_state: Any, mesh_sizes: dict[str, int]) -> Any:
    """PartitionSpecs for every array of a train-state pytree (ShapeDtypeStructs or arrays)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: spec_for(path_name(path), tuple(np.shape(x)), mesh_sizes), abstract_state)


def unsharded_offenders(abstract_state: Any, specs: Any, min_size: int = MIN_SHARDED_SIZE) -> list[str]:
    """Paths (with shapes) of arrays of at least `min_size` elements whose spec does not use `fsdp`, except those
    a rule replicates on purpose (no logical axis mapped to fsdp: the stacked [depth, width] biases and scales,
    which reach min_size from ViT-L on)."""
    offenders = []
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    flat = jax.tree_util.tree_leaves_with_path(abstract_state)
    for (path, x), spec in zip(flat, flat_specs, strict=True):
        name, shape = path_name(path), tuple(np.shape(x))
        axes = logical_axes(name, shape)
        replicated_by_rule = axes is not None and "fsdp" not in (LOGICAL_TO_MESH.get(a) for a in axes if a)
        if math.prod(shape) >= min_size and "fsdp" not in tuple(spec) and not replicated_by_rule:
            offenders.append(f"{name} {shape}")
    return offenders


def state_shardings(abstract_state: Any, mesh: Mesh, *, min_sharded_size: int = MIN_SHARDED_SIZE) -> Any:
    """Train-state layout: FSDP over `fsdp`, heads / MLP units over `tensor` (rules above).

    With fsdp > 1 raises ValueError naming every array of >= min_sharded_size elements left unsharded (a new
    parameter name the rules miss, or a width the fsdp size does not divide)."""
    sizes = dict(mesh.shape)
    specs = state_specs(abstract_state, sizes)
    if sizes.get("fsdp", 1) > 1:
        offenders = unsharded_offenders(abstract_state, specs, min_sharded_size)
        if offenders:
            raise ValueError(f"config.mesh.fsdp={sizes['fsdp']}: these state arrays (>= {min_sharded_size} elements) "
                             f"would stay replicated (no divisible dimension or no rule in "
                             f"jepa/sharding.py PARAM_RULES): " + "; ".join(offenders))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def bytes_per_device(abstract_state: Any, shardings: Any) -> int:
    """Bytes one device holds of a pytree laid out with `shardings`, from shapes only (shards are even)."""
    return sum(math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
               for x, s in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings), strict=True))


def replicated_bytes(abstract_state: Any) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state))


def describe(abstract_state: Any, shardings: Any) -> str:
    """One line per array: path, shape, spec (for logs and scale_bench --verbose)."""
    lines = []
    flat = jax.tree_util.tree_leaves_with_path(abstract_state)
    for (path, x), s in zip(flat, jax.tree.leaves(shardings), strict=True):
        lines.append(f"{path_name(path):70s} {str(tuple(x.shape)):24s} {s.spec}")
    return "\n".join(lines)


# ---------------------------------------------------------------- multi-process runtime


def _cluster_env() -> str | None:
    """Which scheduler's environment jax.distributed.initialize() can read on its own, if any."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
        return "SLURM"
    if env.get("OMPI_COMM_WORLD_SIZE") and int(env["OMPI_COMM_WORLD_SIZE"]) > 1:
        return "Open MPI"
    if env.get("TPU_WORKER_HOSTNAMES") and "," in env["TPU_WORKER_HOSTNAMES"]:
        return "TPU pod"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU multislice"
    return None


def initialize_distributed(dist_cfg) -> bool:
    """Starts JAX's multi-controller runtime when configured; returns whether several processes take part.

    config.distributed.mode: "off" never; "on" always; "auto" when a coordinator address is given or the
    environment is a multi-process SLURM / Open MPI / TPU-pod job. Explicit coordinator_address / num_processes /
    process_id win over auto-detection. On CPU the collectives go through gloo. Must run before anything touches
    a JAX backend; calling it again in the same process is a no-op.
    """
    mode = str(dist_cfg.mode)
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"config.distributed.mode must be one of {', '.join(DISTRIBUTED_MODES)}, got {mode!r}")
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    explicit = bool(dist_cfg.coordinator_address)
    detected = _cluster_env()
    if mode == "off" or (mode == "auto" and not explicit and detected is None):
        return False
    kwargs = {}
    if explicit:
        if int(dist_cfg.num_processes) < 1 or not 0 <= int(dist_cfg.process_id) < int(dist_cfg.num_processes):
            raise ValueError(f"config.distributed: coordinator_address={dist_cfg.coordinator_address!r} needs "
                             f"num_processes >= 1 and 0 <= process_id < num_processes, got "
                             f"num_processes={dist_cfg.num_processes} process_id={dist_cfg.process_id}")
        kwargs = dict(coordinator_address=str(dist_cfg.coordinator_address),
                      num_processes=int(dist_cfg.num_processes), process_id=int(dist_cfg.process_id))
    if dist_cfg.local_device_ids:
        kwargs["local_device_ids"] = [int(i) for i in str(dist_cfg.local_device_ids).split(",")]
    # Only the CPU client reads this (harmless on accelerators): cross-process CPU collectives via gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("jax.distributed.initialize(%s) (%s)", kwargs or "auto-detected", "explicit" if explicit else detected)
    jax.distributed.initialize(**kwargs, initialization_timeout=int(dist_cfg.timeout_s))
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def sync(name: str) -> None:
    """A barrier across processes (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on at least one (no-op with one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
    return bool(np.max(flags))
