"""The generation cache: per full-attention layer a preallocated KV buffer, per delta-net layer the conv inputs
and the float32 recurrent state, plus how many slots are filled and which of them hold real tokens.

Sequences are left-padded so that every row writes the same slot at each step; padded slots are never valid keys and
never touch the delta-net state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qwen_jax.config import LINEAR_ATTENTION, TextConfig
from qwen_jax.layers.gated_deltanet import DeltaNetState


class KVCache(NamedTuple):
    """Keys (normed, rotated) and values `[batch, max_len, kv_heads, head_dim]`."""

    k: jax.Array
    v: jax.Array


class Cache(NamedTuple):
    layers: tuple[KVCache | DeltaNetState, ...]
    offset: jax.Array  # int32 scalar: slots written so far
    valid: jax.Array  # [batch, max_len] bool: slot holds a real token


def init_cache(config: TextConfig, batch: int, max_len: int, dtype: Any) -> Cache:
    """An empty cache for `batch` rows of up to `max_len` slots; `dtype` is the activation dtype."""
    layers = []
    for kind in config.layer_types:
        if kind == LINEAR_ATTENTION:
            conv = jnp.zeros((batch, config.linear_conv_kernel_dim - 1, config.conv_dim), dtype)
            recurrent = jnp.zeros(
                (batch, config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim),
                jnp.float32,
            )
            layers.append(DeltaNetState(conv, recurrent))
        else:
            shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
            layers.append(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
    return Cache(tuple(layers), jnp.zeros((), jnp.int32), jnp.zeros((batch, max_len), bool))
