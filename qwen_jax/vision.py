"""The vision tower of Qwen3-VL and Qwen3.5 (a ViT over 2 x 16 x 16 patches) and how its features enter the text.

pixel_values `[patches, C*T*P*P]` (block-major patch order, as the processor writes them) -> patch embedding + the
learned 2D position table bilinearly resampled to each frame's size -> blocks of (LayerNorm, attention restricted to
each frame with 2D axial rotary, LayerNorm, GELU MLP) -> the 2 x 2 merger `[patches / 4, out_hidden]`. Qwen3-VL also
merges the outputs of the blocks in `deepstack_visual_indexes` (DeepStack); the decoder adds them to the visual
positions after its first layers.

Grids (`grid_thw`: per image or video, temporal x height x width in patches) fix the shapes. What the tower needs
of them per patch (position-table taps, rotary tables, frame ids) is a `PatchLayout` computed here in numpy; for
inference the grids are also static (tuples) under jit so that attention runs frame by frame, while a training step
takes the layout of a fixed-size batch of packed images as arrays and masks attention by frame instead.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import VisionConfig
from qwen_jax.layers.linear import INIT_STD, Linear
from qwen_jax.layers.rope import apply_rotary

Grid = tuple[tuple[int, int, int], ...]


class PatchLayout(NamedTuple):
    """What the tower needs to know of each patch beyond its pixels, all `[patches, ...]`:

    pos_index int32 `[patches, 4]` and pos_weight float32 `[patches, 4]`: the bilinear taps into the learned square
    position table; cos, sin float32 `[patches, head_dim]`: the 2D axial rotary; frame int32 `[patches]`: patches
    attend only to patches of the same frame (0 marks padding patches of a fixed-size training batch)."""

    pos_index: Any
    pos_weight: Any
    cos: Any
    sin: Any
    frame: Any


def patch_coordinates(grid: Grid, merge: int) -> dict[str, np.ndarray]:
    """int32 `[patches]` arrays `row`, `col` (of each patch in its frame), `height`, `width` (its frame's, in
    patches) and `frame` (1, 2, ... over all frames of `grid`), in the processor's block-major order (frames, merge
    blocks, 2x2 inside)."""
    out = {k: [] for k in ("row", "col", "height", "width", "frame")}
    frames = 0
    for t, h, w in grid:
        r = np.arange(h).reshape(h // merge, merge)[:, None, :, None]
        c = np.arange(w).reshape(w // merge, merge)[None, :, None, :]
        r, c = np.broadcast_arrays(r, c)  # [h/m, w/m, m, m]
        out["row"].append(np.tile(r.reshape(-1), t))
        out["col"].append(np.tile(c.reshape(-1), t))
        out["height"].append(np.full(t * h * w, h))
        out["width"].append(np.full(t * h * w, w))
        out["frame"].append(np.repeat(frames + 1 + np.arange(t), h * w))
        frames += t
    return {k: np.concatenate(v).astype(np.int32) if v else np.zeros(0, np.int32) for k, v in out.items()}


def position_interpolation(coords: dict[str, np.ndarray], cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear (align_corners=True) resampling of the square position table to each patch's frame size: table
    indices and weights `[patches, 4]` (coords: `patch_coordinates`)."""
    side = int(cfg.num_position_embeddings**0.5)

    def taps(index, size):
        src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
        floor = np.floor(src)
        offsets = np.arange(2)
        tap = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
        weight = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets), 0, None).astype(np.float32)
        return tap, weight

    h_tap, h_weight = taps(coords["row"], coords["height"])
    w_tap, w_weight = taps(coords["col"], coords["width"])
    indices = (h_tap[:, :, None] * side + w_tap[:, None, :]).reshape(-1, 4)
    weights = (h_weight[:, :, None] * w_weight[:, None, :]).reshape(-1, 4)
    return indices.astype(np.int32), weights


def rotary_tables(coords: dict[str, np.ndarray], cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """2D axial rotary cos/sin `[patches, head_dim]` (float32): a quarter of the head rotates with the row, a quarter
    with the column, doubled as `cat(f, f)` (coords: `patch_coordinates`)."""
    quarter = cfg.head_dim // 2
    # The power in float64, rounded once to float32 (closer to the reference's float32 pow than numpy's float32 one).
    exponents = (np.arange(0, quarter, 2, dtype=np.float32) / np.float32(quarter)).astype(np.float64)
    inv_freq = (np.float32(1.0) / np.power(np.float64(cfg.rope_theta), exponents).astype(np.float32)).astype(np.float32)
    rows, cols = coords["row"], coords["col"]
    freqs = np.concatenate([rows[:, None] * inv_freq, cols[:, None] * inv_freq], axis=-1).astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def layout_from_coordinates(coords: dict[str, np.ndarray], cfg: VisionConfig) -> PatchLayout:
    """The `PatchLayout` (numpy) of patches with these coordinates (`patch_coordinates`)."""
    return PatchLayout(*position_interpolation(coords, cfg), *rotary_tables(coords, cfg), coords["frame"])


def patch_layout(grid: Grid, cfg: VisionConfig) -> PatchLayout:
    """The `PatchLayout` (numpy) of the patches of `grid`, in the processor's order."""
    return layout_from_coordinates(patch_coordinates(grid, cfg.spatial_merge_size), cfg)


class VisionAttention(nn.Module):
    """Full attention within each frame. With a static `grid`, the patches of entry (t, h, w) are t frames of h * w
    patches attended to as a batch of t, so memory grows with the frame size, not with the patches in the call;
    without one (a fixed-size training batch of packed images), attention over all patches, masked to equal
    `frame` ids."""

    cfg: VisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, frame: jax.Array, grid: Grid | None) -> jax.Array:
        n, d = x.shape
        heads = self.cfg.num_heads
        qkv = Linear(3 * d, ("vit_embed", "vit_qkv"), name="qkv", dtype=self.dtype, use_bias=True)(x)
        q, k, v = jnp.moveaxis(qkv.reshape(n, 3, heads, d // heads), 1, 0)
        # Rotary in float32 on [1, n, heads, dim].
        q, k = (apply_rotary(t[None].astype(jnp.float32), cos[None], sin[None])[0].astype(x.dtype) for t in (q, k))
        if grid is None:
            frames = [(q[None], k[None], v[None], frame[:, None] == frame[None, :])]
        else:
            frames, start = [], 0
            for t, h, w in grid:
                frames.append(
                    tuple(a[start : start + t * h * w].reshape(t, h * w, heads, d // heads) for a in (q, k, v))
                    + (None,)
                )
                start += t * h * w
        outputs = []
        for fq, fk, fv, allowed in frames:
            scores = jnp.einsum("fqhd,fkhd->fhqk", fq, fk, preferred_element_type=jnp.float32) * (d // heads) ** -0.5
            if allowed is not None:
                scores = jnp.where(allowed, scores, -jnp.inf)
            probs = jax.nn.softmax(scores, axis=-1).astype(fv.dtype)
            outputs.append(jnp.einsum("fhqk,fkhd->fqhd", probs, fv).reshape(-1, d))
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
    def __call__(self, x, cos, sin, frame, grid):
        norm = dict(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32)
        attention = VisionAttention(self.cfg, self.dtype, name="attn")
        x = x + attention(nn.LayerNorm(**norm, name="norm1")(x), cos, sin, frame, grid)
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
    """pixel_values `[patches, C*T*P*P]` -> (merged features `[patches / 4, out_hidden]`, DeepStack features
    `[len(deepstack_visual_indexes), patches / 4, out_hidden]`).

    `layout`: the patches' `PatchLayout`; `grid`: the static grids the patches come from (each frame attended to as
    a dense block), or None to mask attention by `layout.frame` (packed training batches, where padding patches
    have frame 0 and give features that are never used)."""

    cfg: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, layout: PatchLayout, grid: Grid | None = None):
        c = self.cfg
        x = Linear(c.hidden_size, ("vit_patch", "vit_embed"), name="patch_embed", dtype=self.dtype, use_bias=True)(
            pixel_values.astype(self.dtype)
        )
        table = self.param(
            "pos_embed",
            nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), (None, "vit_embed")),
            (c.num_position_embeddings, c.hidden_size),
            self.dtype,
        )
        weights = jnp.asarray(layout.pos_weight).astype(table.dtype)
        pos = jnp.einsum("nkd,nk->nd", table[jnp.asarray(layout.pos_index)], weights)
        x = x + pos.astype(x.dtype)
        cos, sin, frame = (jnp.asarray(t) for t in (layout.cos, layout.sin, layout.frame))
        deepstack = []
        for j in range(c.depth):
            x = VisionBlock(c, self.dtype, name=f"blocks_{j}")(x, cos, sin, frame, grid)
            if j in c.deepstack_visual_indexes:
                k = c.deepstack_visual_indexes.index(j)
                deepstack.append(PatchMerger(c, True, self.dtype, name=f"deepstack_merger_list_{k}")(x))
        merged = PatchMerger(c, False, self.dtype, name="merger")(x)
        deepstack = jnp.stack(deepstack) if deepstack else jnp.zeros((0, *merged.shape), merged.dtype)
        return merged, deepstack


def _init_vision(cfg: VisionConfig, rng: jax.Array, dtype: Any) -> Any:
    """Boxed (logically partitioned) random parameters of the tower."""
    m = cfg.spatial_merge_size
    grid = ((1, m, m),)
    pixels = jnp.zeros((m * m, cfg.patch_dim), dtype)
    return VisionTower(cfg, dtype).init(rng, pixels, patch_layout(grid, cfg), grid)["params"]


def _boxed_vision_params(cfg: VisionConfig, dtype: Any) -> Any:
    return jax.eval_shape(functools.partial(_init_vision, cfg, jax.random.key(0), dtype))


def init_vision_params(cfg: VisionConfig, rng: jax.Array, dtype: Any = jnp.float32) -> Any:
    """Random vision tower parameters (normal(0.02) weights, zero biases, unit norms)."""
    return nn.meta.unbox(_init_vision(cfg, rng, dtype))


def vision_param_shapes(cfg: VisionConfig, dtype: Any = jnp.float32) -> Any:
    """The vision tower's parameter tree as `jax.ShapeDtypeStruct`s."""
    return nn.meta.unbox(_boxed_vision_params(cfg, dtype))


def vision_logical_axes(cfg: VisionConfig) -> Any:
    from qwen_jax.sharding import logical_axes

    return logical_axes(_boxed_vision_params(cfg, jnp.float32))
