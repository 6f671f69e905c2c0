"""Mesh axis names and the mesh spec strings of the command lines ("data=2,expert=4"), without importing jax (so a
command line can size its simulated devices, or reject a bad spec, before jax starts)."""

from __future__ import annotations

from qwen_jax.errors import InputError

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """ "data=2,expert=4" -> {"data": 2, "expert": 4}."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES:
            raise InputError(f"mesh axis {name!r} unknown (axes: {', '.join(MESH_AXES)})")
        if name in sizes:
            raise InputError(f"mesh axis {name!r} given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise InputError(f"mesh axis {name!r} needs an integer size, got {value!r}") from None
        if sizes[name] < 1:
            raise InputError(f"mesh axis {name!r} must be >= 1")
    return sizes
