"""`load` a converted model directory into a `Model`: its config, its parameters and a jitted forward."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from qwen_jax.checkpoint.format import PARAMS_DIR, cast_tree, read_metadata, restore_tree
from qwen_jax.config import ModelConfig, load_config
from qwen_jax.model import forward


@functools.partial(jax.jit, static_argnames=("config",))
def _jitted_forward(params, config, input_ids, attention_mask, positions):
    return forward(params, config, input_ids, attention_mask, positions)


class Model:
    """A loaded model. `model(input_ids, attention_mask=None)` -> logits `[batch, seq, vocab]` float32."""

    def __init__(self, config: ModelConfig, params: Any, path: Path | None = None):
        self.config = config
        self.params = params
        self.path = path

    def __call__(self, input_ids: Any, attention_mask: Any | None = None, positions: Any | None = None) -> jax.Array:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask, jnp.int32)
        return _jitted_forward(self.params, self.config.text, input_ids, attention_mask, positions)

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
