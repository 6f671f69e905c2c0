"""Images in chat training: a conversation's pictures -> pixel patches and placeholders -> MRoPE positions and the
vision tower's per-patch layout, packed beside the tokens.

Per conversation (`ImageInputs.encode`): the images are preprocessed as the reference processor does
(`qwen_jax.processing.preprocess_images`, the checkpoint's processor settings), each image placeholder of the
rendered text grows to one token per merged patch (`expand_vision_placeholders`), and after tokenization
(`ImageInputs.features`) the document carries

| key | shape | value |
|---|---|---|
| `mrope` | int32 `[tokens, 3]` | its (temporal, height, width) positions, as `get_rope_index` gives them |
| `patches` | float32 `[patches, C*T*P*P]` | its images' pixel patches in order |
| `patch_coords` | int32 `[patches, 5]` | row, col, frame height, frame width, frame number (1, 2, ... in the document) |

and text documents the same keys with `mrope` = 0, 1, ... on all three rows and no patches. The packer fills
`patches_per_row` patches per row beside the `seq_len` tokens, in the same document order, so the k-th image
placeholder of a row (row-major over a batch) takes the k-th merged patch feature. `layout_batch` turns a packed
row's coordinates into the tower's `PatchLayout` arrays with frame ids unique within the row (0 on padding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from qwen_jax.config import ModelConfig, VisionConfig
from qwen_jax.errors import InputError
from qwen_jax.positions import IMAGE, TEXT, mrope_positions
from qwen_jax.processing import ImageSettings, expand_vision_placeholders, preprocess_images
from qwen_jax.vision import layout_from_coordinates, patch_coordinates

COORDINATE_KEYS = ("row", "col", "height", "width", "frame")
LAYOUT_KEYS = ("patch_pos_index", "patch_pos_weight", "patch_cos", "patch_sin", "patch_frame")
"""The batch keys of the tower's `PatchLayout` fields, in its order."""


@dataclasses.dataclass(frozen=True)
class ImageInputs:
    """How a vision-language model's training conversations carry images: the vision tower's config, the image
    placeholder token, the processor settings, and the fixed number of patches per packed row."""

    vision: VisionConfig
    image_token_id: int
    settings: ImageSettings = ImageSettings()
    patches_per_row: int = 4096

    def __post_init__(self) -> None:
        v, s = self.vision, self.settings
        if (s.patch_size, s.temporal_patch_size, s.merge_size) != (
            v.patch_size, v.temporal_patch_size, v.spatial_merge_size
        ):  # fmt: skip
            raise InputError(
                f"the image processor's patch {s.patch_size}, temporal patch {s.temporal_patch_size}, merge "
                f"{s.merge_size} differ from the vision tower's {v.patch_size}, {v.temporal_patch_size}, "
                f"{v.spatial_merge_size}"
            )
        block = v.spatial_merge_size**2
        if self.patches_per_row < block or self.patches_per_row % block:
            raise InputError(f"image_patches_per_row {self.patches_per_row}: must be a positive multiple of {block}")

    @classmethod
    def for_model(cls, config: ModelConfig, settings: ImageSettings, patches_per_row: int) -> ImageInputs:
        if config.vision is None or config.image_token_id is None:
            raise InputError(f"this {config.model_type} model has no vision tower to train on images with")
        return cls(config.vision, config.image_token_id, settings, patches_per_row)

    def encode(self, text: str, paths: Sequence[str]) -> tuple[str, np.ndarray, np.ndarray]:
        """(text with its image placeholders expanded, pixel patches `[patches, C*T*P*P]`, grids `[images, 3]`)."""
        if not paths:
            return text, np.zeros((0, self.vision.patch_dim), np.float32), np.zeros((0, 3), np.int64)
        pixels, grids = preprocess_images(list(paths), **self.settings.kwargs())
        text = expand_vision_placeholders(text, grids, merge_size=self.vision.spatial_merge_size)
        return text, pixels, grids

    def features(self, tokens: np.ndarray, pixels: np.ndarray, grids: np.ndarray) -> dict[str, np.ndarray]:
        """The document's `mrope`, `patches` and `patch_coords` (see the module docstring)."""
        types = np.where(tokens == self.image_token_id, IMAGE, TEXT)[None]
        positions, _ = mrope_positions(types, grids, None, None, self.vision.spatial_merge_size)
        coords = patch_coordinates([tuple(g) for g in np.asarray(grids).tolist()], self.vision.spatial_merge_size)
        return {
            "mrope": np.ascontiguousarray(positions[:, 0].T).astype(np.int32),
            "patches": np.asarray(pixels, np.float32),
            "patch_coords": np.stack([coords[k] for k in COORDINATE_KEYS], axis=-1).reshape(-1, 5).astype(np.int32),
        }

    def row_layout(self, coords: np.ndarray, segment_ids: np.ndarray) -> dict[str, np.ndarray]:
        """A packed row's `patch_coords [P, 5]` and the packer's per-patch document ids `[P]` (0 = padding) -> the
        `LAYOUT_KEYS` arrays, frames numbered 1, 2, ... across the row."""
        key = segment_ids.astype(np.int64) * (len(segment_ids) + 1) + coords[:, 4]
        starts = np.concatenate([[True], key[1:] != key[:-1]]) & (segment_ids > 0)
        frame = np.where(segment_ids > 0, np.cumsum(starts), 0).astype(np.int32)
        as_dict = {k: coords[:, i] for i, k in enumerate(COORDINATE_KEYS)}
        as_dict["height"] = np.maximum(as_dict["height"], 1)  # padding patches: any valid size
        as_dict["width"] = np.maximum(as_dict["width"], 1)
        layout = layout_from_coordinates(dict(as_dict, frame=frame), self.vision)
        return dict(zip(LAYOUT_KEYS, layout))
