"""The generation cache: per full-attention layer a preallocated KV buffer, per delta-net layer the conv inputs
and the float32 recurrent state, plus how many slots are filled and which of them hold real tokens.

The per-layer entries are stacked like the decoder's parameters (`qwen_jax.stacking`): `layers[segment][position]`
holds the entries of that segment's layers at that pattern position, each leaf with a leading `[count]` axis.

Sequences are left-padded so that every row writes the same slot at each step; padded slots are never valid keys and
never touch the delta-net state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qwen_jax.config import LINEAR_ATTENTION, TextConfig
from qwen_jax.layers.gated_deltanet import DeltaNetState
from qwen_jax.stacking import layer_segments


class KVCache(NamedTuple):
    """Keys (normed, rotated) and values `[count, batch, max_len, kv_heads, head_dim]`."""

    k: jax.Array
    v: jax.Array


class Cache(NamedTuple):
    layers: tuple[tuple[KVCache | DeltaNetState, ...], ...]  # [segment][position], stacked over the repeats
    offset: jax.Array  # int32 scalar: slots written so far
    valid: jax.Array  # [batch, max_len] bool: slot holds a real token


def _layer_entry(config: TextConfig, kind: str, count: int, batch: int, max_len: int, dtype: Any):
    if kind == LINEAR_ATTENTION:
        conv = jnp.zeros((count, batch, config.linear_conv_kernel_dim - 1, config.conv_dim), dtype)
        state = (config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim)
        return DeltaNetState(conv, jnp.zeros((count, batch, *state), jnp.float32))
    shape = (count, batch, max_len, config.num_key_value_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def init_cache(config: TextConfig, batch: int, max_len: int, dtype: Any) -> Cache:
    """An empty cache for `batch` rows of up to `max_len` slots; `dtype` is the activation dtype. Under a mesh
    (`jax.set_mesh`), each leaf is laid out by `cache_logical_axes`."""
    layers = tuple(
        tuple(
            _layer_entry(config, config.layer_types[s.layer(0, j)], s.count, batch, max_len, dtype)
            for j in range(s.period)
        )
        for s in layer_segments(config)
    )
    cache = Cache(layers, jnp.zeros((), jnp.int32), jnp.zeros((batch, max_len), bool))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return cache
    from qwen_jax.sharding import spec_for

    names = cache_logical_axes(cache)
    specs = jax.tree.map(lambda x, n: spec_for(x.shape, n, mesh), cache, names)
    return jax.lax.with_sharding_constraint(cache, specs)


def cache_logical_axes(cache: Cache) -> Any:
    """Logical axis names of each cache leaf (`qwen_jax.sharding`): rows over the batch axes, heads and conv
    channels over `tensor` like the layers that write them; the layer axis and the slots are never split."""
    kv = (None, "batch", None, "kv_heads", "head_dim")

    def entry(e: Any) -> Any:
        if isinstance(e, KVCache):
            return KVCache(kv, kv)
        return DeltaNetState((None, "batch", None, "conv_dim"), (None, "batch", "gdn_heads", None, None))

    layers = tuple(tuple(entry(e) for e in segment) for segment in cache.layers)
    return Cache(layers, (), ("batch", None))
