"""`load` a converted model directory into a `Model`: its config, its parameters and a jitted forward."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.checkpoint.format import PARAMS_DIR, cast_tree, read_metadata, restore_tree
from qwen_jax.config import ModelConfig, load_config
from qwen_jax.model import forward


@functools.partial(jax.jit, static_argnames=("config",))
def _jitted_forward(params, config, input_ids, attention_mask, positions, visual):
    return forward(params, config, input_ids, attention_mask, positions, visual)


class Model:
    """A loaded model. `model(input_ids, attention_mask=None, ...)` -> logits `[batch, seq, vocab]` float32.

    Vision-language checkpoints also take the processor's outputs: `pixel_values` + `image_grid_thw`,
    `pixel_values_videos` + `video_grid_thw`, and optionally `mm_token_type_ids` (derived from the placeholder
    tokens when absent); positions are then the 3D MRoPE positions.
    """

    def __init__(self, config: ModelConfig, params: Any, path: Path | None = None):
        self.config = config
        self.params = params
        self.path = path

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any | None = None,
        positions: Any | None = None,
        *,
        pixel_values: Any = None,
        image_grid_thw: Any = None,
        pixel_values_videos: Any = None,
        video_grid_thw: Any = None,
        mm_token_type_ids: Any = None,
    ) -> jax.Array:
        from qwen_jax.multimodal import positions_for, visual_inputs

        ids = np.asarray(input_ids)
        visual = visual_inputs(
            self.params, self.config, ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
        )
        if positions is None and visual is not None:
            positions, _ = positions_for(
                self.config, ids, attention_mask, image_grid_thw, video_grid_thw, mm_token_type_ids
            )
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask, jnp.int32)
        positions = None if positions is None else jnp.asarray(positions, jnp.int32)
        ids = jnp.asarray(ids, jnp.int32)
        return _jitted_forward(self.params, self.config.text, ids, attention_mask, positions, visual)

    def __repr__(self) -> str:
        return f"Model({self.config.model_type}, {self.config.text.num_hidden_layers} layers, path={self.path})"


def load(path: str | Path, dtype: Any = None) -> Model:
    """Load a model directory written by `tools/convert.py`.

    dtype: cast the weights (e.g. `jnp.bfloat16`); None keeps the stored dtypes. `A_log`, `dt_bias` and norm weights
    stay float32 either way. Activations compute in the embedding's dtype.
    """
    path = Path(path)
    read_metadata(path)
    config = load_config(path)
    params = restore_tree(path / PARAMS_DIR)
    if dtype is not None:
        params = cast_tree(params, jnp.dtype(dtype))
    params = jax.tree.map(jnp.asarray, params)
    return Model(config, params, path)
