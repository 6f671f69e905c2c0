"""Position ids of the decoder: 1D text positions, and the 3D (temporal, height, width) MRoPE positions of prompts
with images and videos, as the reference's `get_rope_index` computes them.

Per row, over its real tokens: a text run of length L takes `pos .. pos+L-1` on all three rows; a vision run with
grid (t, h, w) (videos are split into one grid per frame, separated by timestamp text) takes temporal `pos + i`,
height `pos + row`, width `pos + col` over the merged (h / merge, w / merge) grid, and then `pos` advances by
`max(h, w) / merge`. Decoding continues at `max(position) + 1`.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from qwen_jax.errors import InputError

TEXT, IMAGE, VIDEO = 0, 1, 2


def as_grids(grid_thw: Sequence[Sequence[int]] | np.ndarray | None) -> list[tuple[int, int, int]]:
    """A `[n, 3]` grid array (or None) as a list of (t, h, w) tuples."""
    if grid_thw is None:
        return []
    return [tuple(int(v) for v in g) for g in np.asarray(grid_thw).reshape(-1, 3)]


def split_video_grids(video_grid_thw: Sequence[Sequence[int]] | np.ndarray | None) -> list[tuple[int, int, int]]:
    """One (1, h, w) grid per temporal patch: timestamps separate the frames of a video in the prompt."""
    return [(1, h, w) for t, h, w in as_grids(video_grid_thw) for _ in range(t)]


def mrope_positions(
    mm_token_type_ids: np.ndarray,
    image_grid_thw: Sequence[Sequence[int]] | None,
    video_grid_thw: Sequence[Sequence[int]] | None,
    attention_mask: np.ndarray | None,
    spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(positions `[3, batch, seq]` int32, 0 at padding; next decode position per row `[batch]`).

    mm_token_type_ids `[batch, seq]`: 0 text, 1 image placeholder, 2 video placeholder. Grids are consumed in order
    across the batch, as the reference does.
    """
    types = np.asarray(mm_token_type_ids)
    batch, seq = types.shape
    mask = np.ones_like(types, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = {IMAGE: iter(as_grids(image_grid_thw)), VIDEO: iter(split_video_grids(video_grid_thw))}
    m = spatial_merge_size
    positions = np.zeros((3, batch, seq), np.int64)
    next_position = np.zeros(batch, np.int64)
    for row in range(batch):
        row_types = types[row][mask[row]]
        pieces, pos = [], 0
        for kind, run in itertools.groupby(row_types.tolist()):
            length = len(list(run))
            if kind == TEXT:
                pieces.append(np.broadcast_to(pos + np.arange(length), (3, length)))
                pos += length
                continue
            grid = next(grids[kind], None)
            if grid is None:
                raise InputError(f"more {'image' if kind == IMAGE else 'video'} placeholders than grids")
            t, h, w = grid[0], grid[1] // m, grid[2] // m
            if t * h * w != length:
                raise InputError(f"a run of {length} vision placeholders does not match a grid of {t}x{h}x{w}")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            pieces.append(np.stack([tt.reshape(-1) + pos, hh.reshape(-1) + pos, ww.reshape(-1) + pos]))
            pos += max(grid[1], grid[2]) // m
        if pieces:
            row_positions = np.concatenate(pieces, axis=1)
            positions[:, row, mask[row]] = row_positions
            next_position[row] = row_positions.max() + 1
    return positions.astype(np.int32), next_position.astype(np.int32)
