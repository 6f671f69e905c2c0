"""Device meshes and the one table of logical-axis rules.

Every parameter carries logical axis names (`embed`, `q_heads`, `expert`, ...); `LOGICAL_RULES` maps them onto the
mesh axes `data`, `fsdp`, `tensor`, `expert`. A dimension that does not divide its mesh axis is replicated instead,
except the expert dimension, where that is an error (experts are what expert parallelism splits).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qwen_jax.errors import InputError
from qwen_jax.mesh_spec import MESH_AXES, parse_mesh_spec

BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or axes, or None for replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("gdn_proj", "tensor"),
    ("gdn_heads", "tensor"),
    ("conv_dim", "tensor"),
    ("conv_kernel", None),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("norm", None),
)


def make_mesh(mesh: Mesh | str | None = None, devices: list | None = None) -> Mesh:
    """A mesh over all four axes with Auto axis types (size 1 where unset).

    mesh: a spec string ("data=2,expert=4"), a `jax.sharding.Mesh` (any axis types; its devices and named axis
    sizes are taken), or None for every device on `data`.
    """
    devices = jax.devices() if devices is None else devices
    if isinstance(mesh, Mesh):
        unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
        if unknown:
            raise InputError(f"mesh axes {unknown} unknown (axes: {', '.join(MESH_AXES)})")
        sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
        devices = list(mesh.devices.reshape(-1))
    else:
        sizes = {"data": len(devices)} if mesh is None else parse_mesh_spec(mesh)
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise InputError(f"mesh {sizes} needs {math.prod(shape)} devices, {len(devices)} available")
    grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_axes(logical: Any) -> tuple[str, ...]:
    rules = dict(LOGICAL_RULES)
    target = rules.get(logical) if logical is not None else None
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def spec_for(shape: tuple[int, ...], logical: tuple[Any, ...], mesh: Mesh, what: str = "") -> P:
    """The PartitionSpec of an array of `shape` with logical axis names `logical`."""
    used: set[str] = set()
    out = []
    for size, name in zip(shape, logical):
        axes = tuple(a for a in _mesh_axes(name) if a not in used and mesh.shape[a] > 1)
        split = math.prod(mesh.shape[a] for a in axes)
        if axes and size % split:
            if name == "expert":
                raise InputError(f"{what}: {size} experts do not divide the expert axis of size {split}")
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def logical_axes(boxed_params: Any) -> Any:
    """Tree of logical-name tuples from a boxed (`nn.Partitioned`) parameter tree; None for unboxed leaves."""
    return jax.tree.map(
        lambda x: tuple(x.names) if isinstance(x, nn.Partitioned) else None,
        boxed_params,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def tree_shardings(abstract: Any, names: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of arrays (parameters, a cache) given its shapes and logical names (same
    structure; a None name replicates the leaf)."""

    def one(path, leaf, logical):
        what = jax.tree_util.keystr(path)
        logical = logical or (None,) * len(leaf.shape)
        return NamedSharding(mesh, spec_for(tuple(leaf.shape), logical, mesh, what))

    return jax.tree.map_with_path(one, abstract, names)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_axis] = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
    return NamedSharding(mesh, P(*spec))


def batch_divisor(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)
