"""The hybrid decoder: embeddings, `layer_types` of Gated DeltaNet / gated attention layers each followed by a
SwiGLU MLP or a sparse MoE block, the final zero-centred norm and the (tied or untied) LM head.

`forward(params, config, input_ids, ...)` is the pure entry point; `TextModel` is the Flax module behind it. The
parameter tree mirrors the reference's module names: `embed_tokens`, `layers_{i}/{input_layernorm, linear_attn |
self_attn, post_attention_layernorm, mlp}`, `norm`, `lm_head`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_jax.cache import Cache
from qwen_jax.config import LINEAR_ATTENTION, TextConfig
from qwen_jax.layers.attention import Attention, attention_bias
from qwen_jax.layers.gated_deltanet import GatedDeltaNet
from qwen_jax.layers.linear import INIT_STD, Linear
from qwen_jax.layers.mlp import MLP
from qwen_jax.layers.moe import SparseMoE
from qwen_jax.layers.norms import RMSNorm
from qwen_jax.layers.rope import rotary_tables


class VisualInputs(NamedTuple):
    """Vision features placed on the sequence: `mask [batch, seq]` marks image/video placeholder positions,
    `values [batch, seq, hidden]` replace their embeddings, and `deepstack [k, batch, seq, hidden]` are added to
    them after decoder layers 0 .. k-1 (Qwen3-VL's DeepStack; k = 0 for Qwen3.5)."""

    mask: jax.Array
    values: jax.Array
    deepstack: jax.Array


class DecoderLayer(nn.Module):
    """Pre-norm residual block: `x + mixer(norm(x))`, then `+ ffn(norm(.))`. x `[batch, seq, hidden]`."""

    config: TextConfig
    index: int
    dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, bias, mask, state=None, offset=None):
        """`state` is this layer's cache entry (None for a plain forward); returns (x, new state)."""
        c = self.config
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, c.zero_centered_norm, name="input_layernorm")(x)
        if c.layer_types[self.index] == LINEAR_ATTENTION:
            with jax.named_scope("gated_deltanet"):
                h, new_state = GatedDeltaNet(c, self.dtype, name="linear_attn")(h, mask, state)
                new_state = None if state is None else new_state
        else:
            with jax.named_scope("attention"):
                h, new_state = Attention(c, self.dtype, name="self_attn")(h, cos, sin, bias, state, offset)
        x = x + h
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, c.zero_centered_norm, name="post_attention_layernorm")(x)
        with jax.named_scope("ffn"):
            if c.moe_layers[self.index]:
                h = SparseMoE(c, self.dtype, name="mlp")(h)
            else:
                h = MLP(c.hidden_size, c.intermediate_size, self.dtype, name="mlp")(h)
        return x + h, new_state


class TextModel(nn.Module):
    """input_ids `[batch, seq]`, positions `[batch, seq]` or `[3, batch, seq]`, mask `[batch, seq]` (1 = token,
    0 = padding) -> (logits float32, cache).

    Without a cache: logits `[batch, seq, vocab]` of a causal forward over the input alone, and None. With a cache,
    the input continues it from slot `cache.offset`; with `last_only` the logits are those of the last slot only,
    `[batch, vocab]`.
    """

    config: TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        mask: jax.Array | None = None,
        cache: Cache | None = None,
        last_only: bool = False,
        visual: VisualInputs | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        c = self.config
        embed = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("vocab", "embed")),
            name="embed_tokens",
        )
        x = embed(input_ids)
        if visual is not None:
            x = jnp.where(visual.mask[..., None], visual.values.astype(x.dtype), x)
        cos, sin = rotary_tables(positions, c.rope, c.head_dim, self.dtype)
        batch, seq = input_ids.shape
        valid = jnp.ones((batch, seq), bool) if mask is None else mask.astype(bool)
        if cache is None:
            slots = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
            bias = attention_bias(slots, slots, valid)
            offset, states = None, (None,) * c.num_hidden_layers
        else:
            offset, states = cache.offset, cache.layers
            key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, offset))
            query_slots = jnp.broadcast_to(offset + jnp.arange(seq), (batch, seq))
            key_slots = jnp.broadcast_to(jnp.arange(key_valid.shape[1]), key_valid.shape)
            bias = attention_bias(query_slots, key_slots, key_valid)
        new_states = []
        for i in range(c.num_hidden_layers):
            with jax.named_scope(f"layer_{i}"):
                layer = DecoderLayer(c, i, self.dtype, name=f"layers_{i}")
                x, state = layer(x, cos, sin, bias, mask, states[i], offset)
                new_states.append(state)
            if visual is not None and i < visual.deepstack.shape[0]:
                x = x + jnp.where(visual.mask[..., None], visual.deepstack[i].astype(x.dtype), 0)
        if last_only:
            x = x[:, -1]
        x = RMSNorm(c.hidden_size, c.rms_norm_eps, c.zero_centered_norm, name="norm")(x)
        if c.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = Linear(c.vocab_size, ("embed", "vocab"), name="lm_head", dtype=self.dtype)(x)
        new_cache = None if cache is None else Cache(tuple(new_states), offset + seq, key_valid)
        return logits.astype(jnp.float32), new_cache


def default_positions(attention_mask: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    """Text positions `[batch, seq]`: 0, 1, ... over the real tokens of each row (left padding gets 0)."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def compute_dtype(params: Any) -> jnp.dtype:
    """The activation dtype of a parameter tree: that of its embedding table."""
    return jnp.dtype(params["embed_tokens"]["embedding"].dtype)


def text_params(params: Any) -> Any:
    """The decoder's part of a parameter tree (everything but the vision tower)."""
    return {k: v for k, v in params.items() if k != "visual"}


def forward(
    params: Any,
    config: TextConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    visual: VisualInputs | None = None,
) -> jax.Array:
    """Logits `[batch, seq, vocab]` (float32) of a full causal forward. Computes in the embedding's dtype.
    positions: `[batch, seq]`, `[3, batch, seq]` (MRoPE), or None for text positions from the mask."""
    if positions is None:
        positions = default_positions(attention_mask, input_ids.shape)
    model = TextModel(config, compute_dtype(params))
    return model.apply({"params": text_params(params)}, input_ids, positions, attention_mask, None, False, visual)[0]


def forward_with_cache(
    params: Any,
    config: TextConfig,
    input_ids: jax.Array,
    positions: jax.Array,
    cache: Cache,
    attention_mask: jax.Array | None = None,
    last_only: bool = False,
    visual: VisualInputs | None = None,
) -> tuple[jax.Array, Cache]:
    """Continue `cache` with `input_ids [batch, seq]` at `positions`; returns (logits, updated cache). Logits are
    `[batch, seq, vocab]`, or `[batch, vocab]` for the last slot with `last_only`."""
    model = TextModel(config, compute_dtype(params))
    return model.apply(
        {"params": text_params(params)}, input_ids, positions, attention_mask, cache, last_only, visual
    )


def init_params(config: TextConfig, rng: jax.Array, dtype: Any = jnp.float32) -> Any:
    """Random parameters (logical-axis metadata stripped), initialized like the reference."""
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = TextModel(config, dtype).init(rng, ids, ids)
    return nn.meta.unbox(variables["params"])


def _abstract_params(config: TextConfig, dtype: Any) -> Any:
    """The boxed (logical-axis) parameter tree as `jax.ShapeDtypeStruct`s, traced once per distinct layer kind so
    that the cost does not grow with depth."""
    ids = jnp.zeros((1, 1), jnp.int32)
    key = jax.random.key(0)
    top_config = config.replace(num_hidden_layers=0, layer_types=(), moe_layers=())
    tree = dict(jax.eval_shape(lambda: TextModel(top_config, dtype).init(key, ids, ids))["params"])
    x = jnp.zeros((1, 1, config.hidden_size), dtype)
    rot = jnp.zeros((1, 1, config.rotary_dim), dtype)
    bias = jnp.zeros((1, 1, 1, 1), jnp.float32)
    kinds: dict = {}
    for i in range(config.num_hidden_layers):
        kind = (config.layer_types[i], config.moe_layers[i])
        if kind not in kinds:
            layer = DecoderLayer(config, i, dtype)
            kinds[kind] = jax.eval_shape(lambda: layer.init(key, x, rot, rot, bias, None))["params"]
        tree[f"layers_{i}"] = kinds[kind]
    return tree


def param_shapes(config: TextConfig, dtype: Any = jnp.float32) -> Any:
    """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return nn.meta.unbox(_abstract_params(config, dtype))


def param_logical_axes(config: TextConfig) -> Any:
    """The parameter tree's logical axis names (tuples per leaf), for `qwen_jax.sharding`."""
    from qwen_jax.sharding import logical_axes

    return logical_axes(_abstract_params(config, jnp.float32))
