"""Putting images and videos into a prompt's forward: run the vision tower, place its features on the placeholder
tokens (in sequence order, as the reference's `masked_scatter` does), and build the 3D MRoPE positions."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import ModelConfig, VisionConfig
from qwen_jax.errors import InputError
from qwen_jax.model import VisualInputs, compute_dtype
from qwen_jax.positions import IMAGE, TEXT, VIDEO, as_grids, mrope_positions
from qwen_jax.vision import Grid, VisionTower


@functools.partial(jax.jit, static_argnames=("cfg", "grid", "dtype"))
def encode(params: Any, cfg: VisionConfig, pixel_values: jax.Array, grid: Grid, dtype: Any):
    """(features `[patches / 4, out_hidden]`, DeepStack features `[k, patches / 4, out_hidden]`)."""
    return VisionTower(cfg, dtype).apply({"params": params}, pixel_values, grid)


def token_types(input_ids: np.ndarray, config: ModelConfig) -> np.ndarray:
    """mm_token_type_ids from the placeholder tokens: 0 text, 1 image, 2 video."""
    types = np.full(input_ids.shape, TEXT, np.int32)
    types[input_ids == config.image_token_id] = IMAGE
    types[input_ids == config.video_token_id] = VIDEO
    return types


def _place(features: jax.Array, where: np.ndarray, kind: str) -> jax.Array:
    """Rows of `features [..., n, hidden]` gathered onto `[..., batch, seq, hidden]` so that the True slots of
    `where [batch, seq]` get them in row-major order (other slots get arbitrary rows)."""
    count = int(where.sum())
    if count != features.shape[-2]:
        raise InputError(f"{kind} placeholders and features differ: {count} tokens, {features.shape[-2]} features")
    index = np.clip(np.cumsum(where.reshape(-1)) - 1, 0, None).reshape(where.shape)
    return features[..., index, :]


def visual_inputs(
    params: Any,
    config: ModelConfig,
    input_ids: np.ndarray,
    pixel_values: Any = None,
    image_grid_thw: Any = None,
    pixel_values_videos: Any = None,
    video_grid_thw: Any = None,
) -> VisualInputs | None:
    """Vision features on the sequence `[batch, seq]` of `input_ids`, or None without images and videos."""
    if pixel_values is None and pixel_values_videos is None:
        return None
    if config.vision is None:
        raise InputError(f"this {config.model_type} checkpoint has no vision tower")
    ids = np.asarray(input_ids)
    dtype = compute_dtype(params)
    hidden = config.text.hidden_size
    values = jnp.zeros((*ids.shape, hidden), dtype)
    depth = len(config.vision.deepstack_visual_indexes)
    deepstack = jnp.zeros((depth, *ids.shape, hidden), dtype)
    mask = np.zeros(ids.shape, bool)
    for pixels, grid_thw, token, kind in (
        (pixel_values, image_grid_thw, config.image_token_id, "image"),
        (pixel_values_videos, video_grid_thw, config.video_token_id, "video"),
    ):
        if pixels is None:
            continue
        if grid_thw is None:
            raise InputError(f"{kind} pixel values given without their grid_thw")
        grid = tuple(as_grids(grid_thw))
        features, stacked = encode(params["visual"], config.vision, jnp.asarray(pixels), grid, dtype)
        where = ids == token
        values = jnp.where(where[..., None], _place(features, where, kind).astype(dtype), values)
        if depth:
            deepstack = jnp.where(where[None, ..., None], _place(stacked, where, kind).astype(dtype), deepstack)
        mask |= where
    return VisualInputs(jnp.asarray(mask), values, deepstack)


def positions_for(
    config: ModelConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_grid_thw: Sequence | None = None,
    video_grid_thw: Sequence | None = None,
    mm_token_type_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(positions `[3, batch, seq]` or `[batch, seq]`, next decode position per row `[batch]`)."""
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if config.vision is None or (image_grid_thw is None and video_grid_thw is None):
        positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32)
        return positions, positions.max(axis=-1) + 1
    types = token_types(ids, config) if mm_token_type_ids is None else np.asarray(mm_token_type_ids)
    return mrope_positions(types, image_grid_thw, video_grid_thw, mask, config.vision.spatial_merge_size)
