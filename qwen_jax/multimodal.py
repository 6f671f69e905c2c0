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
from qwen_jax.vision import Grid, PatchLayout, VisionTower, patch_layout


@functools.partial(jax.jit, static_argnames=("cfg", "grid", "dtype"))
def encode(params: Any, cfg: VisionConfig, pixel_values: jax.Array, grid: Grid, dtype: Any):
    """(features `[patches / 4, out_hidden]`, DeepStack features `[k, patches / 4, out_hidden]`)."""
    return VisionTower(cfg, dtype).apply({"params": params}, pixel_values, patch_layout(grid, cfg), grid)


def token_types(input_ids: np.ndarray, config: ModelConfig) -> np.ndarray:
    """mm_token_type_ids from the placeholder tokens: 0 text, 1 image, 2 video."""
    types = np.full(input_ids.shape, TEXT, np.int32)
    types[input_ids == config.image_token_id] = IMAGE
    types[input_ids == config.video_token_id] = VIDEO
    return types


def place_features(features: jax.Array, where: Any, kind: str = "vision") -> jax.Array:
    """Rows of `features [..., n, hidden]` gathered onto `[..., batch, seq, hidden]` so that the True slots of
    `where [batch, seq]` get them in row-major order (other slots get arbitrary rows). A numpy `where` must mark
    exactly n slots; a traced one (training batches, whose feature rows are padded) at most n."""
    if isinstance(where, np.ndarray):
        count = int(where.sum())
        if count != features.shape[-2]:
            raise InputError(f"{kind} placeholders and features differ: {count} tokens, {features.shape[-2]} features")
        index = np.clip(np.cumsum(where.reshape(-1)) - 1, 0, None).reshape(where.shape)
    else:
        index = jnp.clip(jnp.cumsum(where.reshape(-1)) - 1, 0, features.shape[-2] - 1).reshape(where.shape)
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
        values, deepstack = _scatter(features, stacked, where, kind, values, deepstack)
        mask |= where
    return VisualInputs(jnp.asarray(mask), values, deepstack)


def _scatter(features, stacked, where, kind: str, values, deepstack, per_row: bool = False):
    """(`values [batch, seq, hidden]`, `deepstack [k, batch, seq, hidden]`) with the vision features (`[n, hidden]`,
    `[k, n, hidden]`) placed on the True slots of `where [batch, seq]`; `per_row`: the features are
    `[batch, n, hidden]` / `[k, batch, n, hidden]`, each row's placed on that row."""
    place = functools.partial(place_features, kind=kind)
    if per_row:
        place = jax.vmap(place, in_axes=(-3, 0), out_axes=-3)
    values = jnp.where(where[..., None], place(features, where).astype(values.dtype), values)
    if deepstack.shape[0]:
        deepstack = jnp.where(where[None, ..., None], place(stacked, where).astype(deepstack.dtype), deepstack)
    return values, deepstack


def packed_visual_inputs(
    params: Any,
    cfg: VisionConfig,
    image_token_id: int,
    input_ids: jax.Array,
    pixel_values: jax.Array,
    layout: PatchLayout,
    dtype: Any,
) -> VisualInputs:
    """Vision features of a training batch (traceable): input_ids `[batch, seq]`; pixel_values `[batch, P, C*T*P*P]`
    and the `PatchLayout` arrays `[batch, P, ...]` of each row's packed image patches, frames numbered per row
    (0 = padding). The tower runs on all `batch * P` patches at once, attention masked to each frame, and the k-th
    merged feature of a row goes to the row's k-th image placeholder."""
    batch, patches = pixel_values.shape[:2]
    frame = jnp.where(layout.frame > 0, layout.frame + (patches + 1) * jnp.arange(batch)[:, None], 0)
    flat = PatchLayout(*(jnp.reshape(x, (batch * patches, *x.shape[2:])) for x in layout[:-1]), frame.reshape(-1))
    features, stacked = VisionTower(cfg, dtype).apply(
        {"params": params}, pixel_values.reshape(batch * patches, -1), flat, None
    )
    hidden, merged = features.shape[-1], patches // cfg.spatial_merge_size**2
    features = features.reshape(batch, merged, hidden)
    stacked = stacked.reshape(stacked.shape[0], batch, merged, hidden)
    values = jnp.zeros((*input_ids.shape, hidden), dtype)
    deepstack = jnp.zeros((stacked.shape[0], *input_ids.shape, hidden), dtype)
    where = input_ids == image_token_id
    values, deepstack = _scatter(features, stacked, where, "image", values, deepstack, per_row=True)
    return VisualInputs(where, values, deepstack)


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
