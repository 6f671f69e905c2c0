"""The vision tower of Qwen3-VL and Qwen3.5 (a ViT over 2 x 16 x 16 patches) and how its features enter the text.

pixel_values `[patches, C*T*P*P]` (block-major patch order, as the processor writes them) -> patch embedding + the
learned 2D position table bilinearly resampled to each grid -> blocks of (LayerNorm, attention restricted to each
frame with 2D axial rotary, LayerNorm, GELU MLP) -> the 2 x 2 merger `[patches / 4, out_hidden]`. Qwen3-VL also
merges the outputs of the blocks in `deepstack_visual_indexes` (DeepStack); the decoder adds them to the visual
positions after its first layers.

Grids (`grid_thw`: per image or video, temporal x height x width in patches) fix the shapes, so they are static
(tuples) under jit; everything derived from them is computed here in numpy.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import VisionConfig
from qwen_jax.layers.linear import INIT_STD, Linear
from qwen_jax.layers.rope import apply_rotary

Grid = tuple[tuple[int, int, int], ...]


def _patch_rows_cols(grid: Grid, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of every patch, in the processor's block-major order (frames, merge blocks, 2x2 inside)."""
    rows, cols = [], []
    for t, h, w in grid:
        r = np.arange(h).reshape(h // merge, merge)[:, None, :, None]
        c = np.arange(w).reshape(w // merge, merge)[None, :, None, :]
        r, c = np.broadcast_arrays(r, c)  # [h/m, w/m, m, m]
        rows.append(np.tile(r.reshape(-1), t))
        cols.append(np.tile(c.reshape(-1), t))
    return np.concatenate(rows), np.concatenate(cols)


def position_interpolation(grid: Grid, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear (align_corners=True) resampling of the square position table to each grid: table indices and
    weights `[patches, 4]`."""
    side = int(cfg.num_position_embeddings**0.5)
    rows, cols = _patch_rows_cols(grid, cfg.spatial_merge_size)
    sizes_h = np.concatenate([np.full(t * h * w, h) for t, h, w in grid])
    sizes_w = np.concatenate([np.full(t * h * w, w) for t, h, w in grid])

    def taps(index, size):
        src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
        floor = np.floor(src)
        offsets = np.arange(2)
        tap = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
        weight = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets), 0, None).astype(np.float32)
        return tap, weight

    h_tap, h_weight = taps(rows, sizes_h)
    w_tap, w_weight = taps(cols, sizes_w)
    indices = (h_tap[:, :, None] * side + w_tap[:, None, :]).reshape(-1, 4)
    weights = (h_weight[:, :, None] * w_weight[:, None, :]).reshape(-1, 4)
    return indices.astype(np.int32), weights


def rotary_tables(grid: Grid, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """2D axial rotary cos/sin `[patches, head_dim]` (float32): a quarter of the head rotates with the row, a quarter
    with the column, doubled as `cat(f, f)`."""
    quarter = cfg.head_dim // 2
    # The power in float64, rounded once to float32 (closer to the reference's float32 pow than numpy's float32 one).
    exponents = (np.arange(0, quarter, 2, dtype=np.float32) / np.float32(quarter)).astype(np.float64)
    inv_freq = (np.float32(1.0) / np.power(np.float64(cfg.rope_theta), exponents).astype(np.float32)).astype(np.float32)
    rows, cols = _patch_rows_cols(grid, cfg.spatial_merge_size)
    freqs = np.concatenate([rows[:, None] * inv_freq, cols[:, None] * inv_freq], axis=-1).astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


class VisionAttention(nn.Module):
    """Full attention within each frame: the patches of grid entry (t, h, w) are t frames of h * w patches, attended
    to as a batch of t, so memory grows with the frame size, not with the number of patches in the call."""

    cfg: VisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, grid: Grid) -> jax.Array:
        n, d = x.shape
        heads = self.cfg.num_heads
        qkv = Linear(3 * d, ("vit_embed", "vit_qkv"), name="qkv", dtype=self.dtype, use_bias=True)(x)
        q, k, v = jnp.moveaxis(qkv.reshape(n, 3, heads, d // heads), 1, 0)
        # Rotary in float32 on [1, n, heads, dim].
        q, k = (apply_rotary(t[None].astype(jnp.float32), cos[None], sin[None])[0].astype(x.dtype) for t in (q, k))
        outputs, start = [], 0
        for t, h, w in grid:
            frames = [a[start : start + t * h * w].reshape(t, h * w, heads, d // heads) for a in (q, k, v)]
            scores = jnp.einsum("fqhd,fkhd->fhqk", frames[0], frames[1], preferred_element_type=jnp.float32)
            probs = jax.nn.softmax(scores * (d // heads) ** -0.5, axis=-1).astype(v.dtype)
            outputs.append(jnp.einsum("fhqk,fkhd->fqhd", probs, frames[2]).reshape(t * h * w, d))
            start += t * h * w
        out = jnp.concatenate(outputs)
        return Linear(d, ("vit_qkv", "vit_embed"), name="proj", dtype=self.dtype, use_bias=True)(out)


class VisionMLP(nn.Module):
    cfg: VisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        h = Linear(c.intermediate_size, ("vit_embed", "vit_mlp"), name="linear_fc1", dtype=self.dtype, use_bias=True)(x)
        h = jax.nn.gelu(h, approximate=True)
        return Linear(c.hidden_size, ("vit_mlp", "vit_embed"), name="linear_fc2", dtype=self.dtype, use_bias=True)(h)


class VisionBlock(nn.Module):
    cfg: VisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, grid):
        norm = dict(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32)
        attention = VisionAttention(self.cfg, self.dtype, name="attn")
        x = x + attention(nn.LayerNorm(**norm, name="norm1")(x), cos, sin, grid)
        return x + VisionMLP(self.cfg, self.dtype, name="mlp")(nn.LayerNorm(**norm, name="norm2")(x))


class PatchMerger(nn.Module):
    """Concatenate each 2 x 2 block of patches and project to the text width. `norm_after_merge`: LayerNorm over
    the concatenation (DeepStack mergers) instead of per patch (the main merger)."""

    cfg: VisionConfig
    norm_after_merge: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        width = c.hidden_size * c.spatial_merge_size**2
        norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32, name="norm")
        x = norm(x.reshape(-1, width)) if self.norm_after_merge else norm(x).reshape(-1, width)
        x = Linear(width, ("vit_merged", "vit_merged_mlp"), name="linear_fc1", dtype=self.dtype, use_bias=True)(x)
        x = jax.nn.gelu(x, approximate=False)
        return Linear(c.out_hidden_size, ("vit_merged_mlp", "embed"), name="linear_fc2", dtype=self.dtype,
                      use_bias=True)(x)  # fmt: skip


class VisionTower(nn.Module):
    """pixel_values `[patches, C*T*P*P]` for the images/videos of `grid` -> (merged features `[patches / 4,
    out_hidden]`, DeepStack features `[len(deepstack_visual_indexes), patches / 4, out_hidden]`)."""

    cfg: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, grid: Grid) -> tuple[jax.Array, jax.Array]:
        c = self.cfg
        x = Linear(c.hidden_size, ("vit_patch", "vit_embed"), name="patch_embed", dtype=self.dtype, use_bias=True)(
            pixel_values.astype(self.dtype)
        )
        indices, weights = position_interpolation(grid, c)
        table = self.param(
            "pos_embed",
            nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), (None, "vit_embed")),
            (c.num_position_embeddings, c.hidden_size),
            self.dtype,
        )
        pos = jnp.einsum("nkd,nk->nd", table[jnp.asarray(indices)], jnp.asarray(weights, table.dtype))
        x = x + pos.astype(x.dtype)
        cos, sin = (jnp.asarray(t) for t in rotary_tables(grid, c))
        deepstack = []
        for j in range(c.depth):
            x = VisionBlock(c, self.dtype, name=f"blocks_{j}")(x, cos, sin, grid)
            if j in c.deepstack_visual_indexes:
                k = c.deepstack_visual_indexes.index(j)
                deepstack.append(PatchMerger(c, True, self.dtype, name=f"deepstack_merger_list_{k}")(x))
        merged = PatchMerger(c, False, self.dtype, name="merger")(x)
        deepstack = jnp.stack(deepstack) if deepstack else jnp.zeros((0, *merged.shape), merged.dtype)
        return merged, deepstack


def _boxed_vision_params(cfg: VisionConfig, dtype: Any) -> Any:
    m = cfg.spatial_merge_size
    pixels = jnp.zeros((m * m, cfg.patch_dim), dtype)
    return jax.eval_shape(lambda: VisionTower(cfg, dtype).init(jax.random.key(0), pixels, ((1, m, m),)))["params"]


def vision_param_shapes(cfg: VisionConfig, dtype: Any = jnp.float32) -> Any:
    """The vision tower's parameter tree as `jax.ShapeDtypeStruct`s."""
    return nn.meta.unbox(_boxed_vision_params(cfg, dtype))


def vision_logical_axes(cfg: VisionConfig) -> Any:
    from qwen_jax.sharding import logical_axes

    return logical_axes(_boxed_vision_params(cfg, jnp.float32))
