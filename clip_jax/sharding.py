"""The device mesh, the ONE table from logical axis names to mesh axes, and the
shardings of the train state and of batches.

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with
parameters and optimizer state sharded over it) and ``model`` (tensor
parallelism over attention heads, MLP hidden units and the vocabulary).
The batch is split over ``data x fsdp``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axes. Parameters: "embed" is FSDP-sharded, the
# hidden dimensions are model-parallel. Activations: batch over data x fsdp,
# their embedding dimension ("act_embed") replicated.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("kv", None),
    ("layers", None),  # the stacked-blocks axis of nn.scan
    ("joint", None),
    ("length", None),
    ("norm", None),
    ("act_embed", None),
    # ResNet conv kernels [kh, kw, in, out]: output channels FSDP-sharded as "embed".
    ("conv_in", None),
    ("conv_out", "fsdp"),
)


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes ("data", "fsdp", "model"); one size may be -1 (the rest of the devices).

    Raises ValueError naming ``config.sharding.mesh`` when sizes do not fit the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.sharding.mesh has unknown axes {sorted(unknown)}; use {MESH_AXES}")
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.sharding.mesh={dict(axis_sizes)}: sizes must be >= 1, one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"config.sharding.mesh={dict(axis_sizes)}: {len(devices)} devices are not "
                f"divisible by the fixed axes' product {known}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"config.sharding.mesh={dict(axis_sizes)} needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are available"
        )
    # Auto axes: Linen's logical partitioning needs them (make_mesh defaults to Explicit).
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_devices(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (those dims are replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = math.prod(mesh.shape[a] for a in names)
        if names and dim % ways:
            logging.info("dimension %d is not divisible by mesh axes %s: replicated", dim, names)
            names = ()
        fitted.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*fitted)


def logical_to_shardings(logical_specs, abstract_tree, mesh: Mesh):
    """Logical PartitionSpecs + matching ShapeDtypeStructs -> NamedShardings via `RULES`."""
    mesh_specs = nn.logical_to_mesh(logical_specs, RULES)
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh)),
        mesh_specs,
        abstract_tree,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def to_global(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch (this process's rows) -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()
    }
