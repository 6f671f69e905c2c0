"""Projections fused into one matrix at load time: the delta-net inputs (grouped per key head) and each SwiGLU's
gate and up (interleaved per unit).

Storage (disk, the converter, the reference) keeps four projections of a Gated DeltaNet layer: `in_proj_qkv`
(columns `[q all heads | k all heads | v all value heads]`), `in_proj_z`, `in_proj_b` and `in_proj_a`. The layout
the model computes with (the stacked layout of `qwen_jax.stacking`) holds them as one kernel `in_proj`
`[hidden, key_heads * W]`, `W = 2 * key_dim + group * (2 * value_dim + 2)` with `group = value_heads / key_heads`,
whose columns run key head by key head: `[q_i | k_i | v of group i | z of group i | b of group i | a of group i]`.
One matmul replaces four, and splitting the columns over the `tensor` axis (when it divides the key heads) gives
each device whole key heads with their value heads, so the conv and the delta rule need no exchange.

Likewise a SwiGLU's (dense MLP, shared expert) `gate_proj` and `up_proj` `[hidden, I]` become `gate_up_proj`
`[hidden, 2 * I]` with columns `gate_0, up_0, gate_1, up_1, ...`: any even split of the columns over devices keeps
each unit's gate and up together. (The routed experts are stored with `gate_up_proj` already.)

`fuse_layer` and `split_layer` work on any leading axes (the stacked layer axis) and are exact inverses (column moves only).
"""

from __future__ import annotations

import itertools
from typing import Any

import jax.numpy as jnp
import numpy as np

from qwen_jax.config import TextConfig

SPLIT_NAMES = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
FUSED_NAME = "in_proj"
GATE_UP_NAME = "gate_up_proj"


def _widths(c: TextConfig) -> tuple[int, ...]:
    """Per key head: q, k, v, z, b, a column counts."""
    group = c.linear_num_value_heads // c.linear_num_key_heads
    dk, dv = c.linear_key_head_dim, c.linear_value_head_dim
    return dk, dk, group * dv, group * dv, group, group


def _xp(x: Any) -> Any:
    """numpy for host arrays (saving, export), jax.numpy otherwise."""
    return np if isinstance(x, np.ndarray) else jnp


def fuse_kernels(qkv: Any, z: Any, b: Any, a: Any, c: TextConfig) -> Any:
    """`[..., hidden, n]` kernels of the four projections -> the fused `[..., hidden, key_heads * W]`."""
    hk, dk = c.linear_num_key_heads, c.linear_key_head_dim
    parts = [qkv[..., : hk * dk], qkv[..., hk * dk : 2 * hk * dk], qkv[..., 2 * hk * dk :], z, b, a]
    per_head = [p.reshape(*p.shape[:-1], hk, p.shape[-1] // hk) for p in parts]
    fused = _xp(qkv).concatenate(per_head, axis=-1)
    return fused.reshape(*fused.shape[:-2], -1)


def split_kernels(fused: Any, c: TextConfig) -> tuple[Any, Any, Any, Any]:
    """The inverse of `fuse_kernels`: (qkv, z, b, a) kernels."""
    hk = c.linear_num_key_heads
    per_head = fused.reshape(*fused.shape[:-1], hk, -1)
    xp = _xp(fused)
    bounds = list(itertools.accumulate(_widths(c)))[:-1]
    q, k, v, z, b, a = (p.reshape(*p.shape[:-2], -1) for p in xp.split(per_head, bounds, axis=-1))
    return xp.concatenate([q, k, v], axis=-1), z, b, a


def split_outputs(fused: Any, c: TextConfig) -> tuple[Any, Any, Any, Any]:
    """The fused projection's output `[..., key_heads * W]` -> (mixed qkv `[..., conv_dim]` in the conv's channel
    order, z `[..., value_heads * value_dim]`, b, a `[..., value_heads]`)."""
    return split_kernels(fused, c)


def interleave_gate_up(gate: Any, up: Any) -> Any:
    """`[..., hidden, I]` gate and up kernels -> `[..., hidden, 2 * I]` with columns `gate_0, up_0, gate_1, ...`."""
    stacked = _xp(gate).stack([gate, up], axis=-1)
    return stacked.reshape(*stacked.shape[:-2], -1)


def deinterleave_gate_up(gate_up: Any) -> tuple[Any, Any]:
    """The inverse of `interleave_gate_up` (also splits its output `[..., 2 * I]` into gate and up)."""
    pairs = gate_up.reshape(*gate_up.shape[:-1], -1, 2)
    return pairs[..., 0], pairs[..., 1]


def _is_mlp(group: Any) -> bool:
    """A SwiGLU module's parameters (or names): `down_proj` holds a `kernel` (the routed experts' is an array)."""
    return isinstance(group, dict) and isinstance(group.get("down_proj"), dict)


def _rewrite(tree: Any, linear_attn, mlp) -> Any:
    """`tree` with every delta-net group (`linear_attn`) and SwiGLU group (`mlp`, `shared_expert`) rewritten."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "linear_attn" and isinstance(value, dict):
            out[key] = linear_attn(dict(value))
        elif _is_mlp(value):
            out[key] = mlp(dict(value))
        else:
            out[key] = _rewrite(value, linear_attn, mlp)
    return out


def fuse_layer(layer: Any, c: TextConfig) -> Any:
    """A layer's parameters (any leading axes) with the four delta-net projections fused into `in_proj` and each
    SwiGLU's gate and up projections into `gate_up_proj`."""

    def linear_attn(group: dict) -> dict:
        if FUSED_NAME in group:
            return group
        kernels = [group.pop(name)["kernel"] for name in SPLIT_NAMES]
        return dict(group, **{FUSED_NAME: {"kernel": fuse_kernels(*kernels, c)}})

    def mlp(group: dict) -> dict:
        if GATE_UP_NAME in group:
            return group
        gate, up = group.pop("gate_proj")["kernel"], group.pop("up_proj")["kernel"]
        return dict(group, **{GATE_UP_NAME: {"kernel": interleave_gate_up(gate, up)}})

    return _rewrite(layer, linear_attn, mlp)


def split_layer(layer: Any, c: TextConfig) -> Any:
    """The inverse of `fuse_layer` (the storage layout's separate projections)."""

    def linear_attn(group: dict) -> dict:
        if FUSED_NAME not in group:
            return group
        kernels = split_kernels(group.pop(FUSED_NAME)["kernel"], c)
        return dict(group, **{name: {"kernel": k} for name, k in zip(SPLIT_NAMES, kernels)})

    def mlp(group: dict) -> dict:
        if GATE_UP_NAME not in group:
            return group
        gate, up = deinterleave_gate_up(group.pop(GATE_UP_NAME)["kernel"])
        return dict(group, gate_proj={"kernel": gate}, up_proj={"kernel": up})

    return _rewrite(layer, linear_attn, mlp)


def fuse_layer_names(names: Any) -> Any:
    """Logical axis names of a layer's parameters with the projections fused: each fused kernel is named as the
    first of its parts (`in_proj_qkv`, `gate_proj`), its columns split the same way, now at key-head / unit
    boundaries."""

    def linear_attn(group: dict) -> dict:
        if FUSED_NAME in group:
            return group
        return dict({k: v for k, v in group.items() if k not in SPLIT_NAMES}, **{FUSED_NAME: group["in_proj_qkv"]})

    def mlp(group: dict) -> dict:
        if GATE_UP_NAME in group:
            return group
        rest = {k: v for k, v in group.items() if k not in ("gate_proj", "up_proj")}
        return dict(rest, **{GATE_UP_NAME: group["gate_proj"]})

    return _rewrite(names, linear_attn, mlp)
