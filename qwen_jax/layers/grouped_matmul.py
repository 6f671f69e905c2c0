"""Grouped matmul: rows sorted by group, each group times its own weight matrix (the MoE's expert matmuls).

`jax.lax.ragged_dot` is a real grouped matmul on TPU and GPU, but XLA:CPU lowers it to a dense product with every
group's weights followed by a select, so its cost grows with the number of groups (`bench/grouped_matmul.py`). On
CPU we tile instead: each group's rows are cut into tiles of `tile` rows (its last tile partial), and a `lax.scan`
over the tiles multiplies each by its group's matrix, in place, skipping the tiles past the last group. Work is at
most (rows + groups x tile) x in x out instead of rows x groups x in x out; a group's weights are read once per tile
of its rows. `grouped_ffn` runs an expert FFN's two products (gate/up, then down) in the same loop, one step per
tile. `lax.platform_dependent` picks the path when the program is lowered, so one jitted function serves every
backend. Both are dropless and differentiable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

MIN_TILE, MAX_TILE = 4, 256


def tile_rows(rows: int, groups: int) -> int:
    """The tile: the power of two at or above the mean group size, within [MIN_TILE, MAX_TILE]. Measured on this
    machine's CPU (`bench/grouped_matmul.py`), larger tiles win up to ~128 rows even at 50% padding: each scan step
    costs a fixed overhead besides its matmul. At a mean of 256 rows (2048-token prefill of the issue-6 model, 64
    experts top-8) a 256-row tile prefilled in 1.72 s against 1.80 s with 128 rows (3 alternating rounds). At the
    other end, batch-8 decode (64 rows over 64 experts, one or two rows each) stepped in 39-43 ms with 4-row tiles,
    38-44 ms with 2, 54 ms with 1 and 47 ms with 8 (2-core AMD EPYC)."""
    mean = max(-(-rows // groups), 1)
    return max(MIN_TILE, min(MAX_TILE, 1 << (mean - 1).bit_length()))


def group_matrix(w: jax.Array, group: jax.Array, layer: jax.Array | None, dtype: Any) -> jax.Array:
    """One group's matrix of `w [groups, in, out]` (or of `w[layer]` for `[count, groups, in, out]`) -> `[in, out]`
    in `dtype`: one slice of that matrix alone (no copy of `w[layer]`, whatever dtype conversions XLA inserts)."""
    index = (group,) if layer is None else (layer, group)
    starts = (*index, 0, 0)
    sizes = (*(1,) * len(index), *w.shape[-2:])
    return jax.lax.dynamic_slice(w, starts, sizes).reshape(w.shape[-2:]).astype(dtype)


def _tiled(
    x: jax.Array, group_sizes: jax.Array, groups: int, tile: int, out_features: int,
    per_tile: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:  # fmt: skip
    """The tile loop: `per_tile(rows [tile, in], group)` -> `[tile, out_features]` (float32) for each tile of each
    group's rows -> `[rows, out_features]` in x's dtype, zero past the groups."""
    rows = x.shape[0]
    tiles = -(-rows // tile) + groups  # each group adds at most one partial tile
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes  # first row of each group
    tile_counts = -(-sizes // tile)
    tile_ends = jnp.cumsum(tile_counts)  # tiles of groups 0..g
    t = jnp.arange(tiles, dtype=jnp.int32)
    group = jnp.searchsorted(tile_ends, t, side="right").astype(jnp.int32)  # == groups for the unused tiles
    used = group < groups
    group = jnp.minimum(group, groups - 1)
    first = starts[group] + (t - (tile_ends[group] - tile_counts[group])) * tile  # the tile's first row
    end = starts[group] + sizes[group]  # one past its group's last row
    x = jnp.pad(x, ((0, tile), (0, 0)))  # a tile's window may run past the last row

    # A tile is the window of `tile` rows at `first`; rows past its group's end belong to the next group (or to
    # nothing) and keep what is there. Groups are written in order, so each row ends with its own group's result.
    def one(out: jax.Array, tile_inputs: tuple) -> tuple[jax.Array, None]:
        first, end, group, used = tile_inputs

        def multiply(out: jax.Array) -> jax.Array:
            y = per_tile(jax.lax.dynamic_slice_in_dim(x, first, tile), group)
            mine = (first + jnp.arange(tile)) < end
            here = jax.lax.dynamic_slice_in_dim(out, first, tile)
            return jax.lax.dynamic_update_slice_in_dim(
                out, jnp.where(mine[:, None], y.astype(out.dtype), here), first, 0
            )

        return jax.lax.cond(used, multiply, lambda out: out, out), None

    out = jnp.zeros((rows + tile, out_features), x.dtype)
    out, _ = jax.lax.scan(one, out, (first, end, group, used))
    return out[:rows]


def _tile_product(rows: jax.Array, w: jax.Array, group: jax.Array, layer: jax.Array | None) -> jax.Array:
    return jnp.dot(rows, group_matrix(w, group, layer, rows.dtype), preferred_element_type=jnp.float32)


def _tiled_grouped_matmul(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, tile: int, layer: jax.Array | None = None
) -> jax.Array:
    product = lambda rows, group: _tile_product(rows, w, group, layer)
    return _tiled(x, group_sizes, w.shape[-3], tile, w.shape[-1], product)


def _tiled_grouped_ffn(
    x: jax.Array, gate_up: jax.Array, down: jax.Array, group_sizes: jax.Array, tile: int,
    activation: Callable[[jax.Array], jax.Array], layer: jax.Array | None = None,
) -> jax.Array:  # fmt: skip
    def ffn(rows: jax.Array, group: jax.Array) -> jax.Array:
        h = activation(_tile_product(rows, gate_up, group, layer).astype(x.dtype))
        return _tile_product(h, down, group, layer)

    return _tiled(x, group_sizes, gate_up.shape[-3], tile, down.shape[-1], ffn)


def _ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array, layer: jax.Array | None = None) -> jax.Array:
    if layer is not None:
        w = jax.lax.dynamic_index_in_dim(w, layer, keepdims=False)
    return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, layer: jax.Array | None = None) -> jax.Array:
    """x `[rows, in]` sorted by group, w `[groups, in, out]`, group_sizes `[groups]` (summing to at most rows) ->
    `[rows, out]`: row r of group g is `x[r] @ w[g]`; rows past the groups are zero. With `layer`, w is `[count,
    groups, in, out]` and `w[layer]` is used, read in place on CPU. Computed in x's dtype."""
    tile = tile_rows(x.shape[0], w.shape[-3])
    tiled = functools.partial(_tiled_grouped_matmul, tile=tile, layer=layer)
    ragged = functools.partial(_ragged_dot, layer=layer)
    return jax.lax.platform_dependent(x, w, group_sizes, cpu=tiled, default=ragged)


def grouped_ffn(
    x: jax.Array,
    gate_up: jax.Array,
    down: jax.Array,
    group_sizes: jax.Array,
    activation: Callable[[jax.Array], jax.Array],
    layer: jax.Array | None = None,
) -> jax.Array:
    """`grouped_matmul(activation(grouped_matmul(x, gate_up, ...)), down, ...)`: x `[rows, in]` sorted by group,
    gate_up `[groups, in, mid]`, down `[groups, mid', out]` (`activation` maps mid to mid' features) -> `[rows,
    out]`; `layer` as in `grouped_matmul`. On CPU both products of a tile run in one step of one loop over the tiles
    (half the steps, and the tile's hidden rows stay in cache); elsewhere two `ragged_dot`s."""
    tile = tile_rows(x.shape[0], gate_up.shape[-3])
    tiled = functools.partial(_tiled_grouped_ffn, tile=tile, activation=activation, layer=layer)

    def ragged(x: jax.Array, gate_up: jax.Array, down: jax.Array, group_sizes: jax.Array) -> jax.Array:
        h = activation(_ragged_dot(x, gate_up, group_sizes, layer))
        return _ragged_dot(h, down, group_sizes, layer)

    return jax.lax.platform_dependent(x, gate_up, down, group_sizes, cpu=tiled, default=ragged)
