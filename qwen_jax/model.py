"""The hybrid decoder: embeddings, `layer_types` of Gated DeltaNet / gated attention layers each followed by a
SwiGLU MLP or a sparse MoE block, the final zero-centred norm and the (tied or untied) LM head.

`forward(params, config, input_ids, ...)` and `forward_with_cache` are the pure entry points. The decoder layers run
as one `lax.scan` per segment of repeats of the layer pattern (`qwen_jax.stacking`), over stacked parameters
(`params["layers"]`) and a stacked cache, so compile time does not grow with depth. The other entries mirror the
reference's module names: `embed_tokens`, `norm`, `lm_head`; inside a layer `input_layernorm`, `linear_attn` |
`self_attn`, `post_attention_layernorm`, `mlp`.
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
from qwen_jax.stacking import STACKED, Segment, layer_segments, stack_layers


class VisualInputs(NamedTuple):
    """Vision features placed on the sequence: `mask [batch, seq]` marks image/video placeholder positions,
    `values [batch, seq, hidden]` replace their embeddings, and `deepstack [k, batch, seq, hidden]` are added to
    them after decoder layers 0 .. k-1 (Qwen3-VL's DeepStack; k = 0 for Qwen3.5)."""

    mask: jax.Array
    values: jax.Array
    deepstack: jax.Array


class DecoderLayer(nn.Module):
    """Pre-norm residual block: `x + mixer(norm(x))`, then `+ ffn(norm(.))`. x `[batch, seq, hidden]`.

    `index` is a layer of this block's kind (it picks delta net or attention, MoE or MLP).
    """

    config: TextConfig
    index: int
    dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, bias, mask, state=None, offset=None, cycle=None):
        """`state` is the stacked cache entry of this block's layers (`[count, ...]` leaves; None for a plain
        forward) and `cycle` this layer's index in it; returns (x, updated stacked state)."""
        c = self.config
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, c.zero_centered_norm, name="input_layernorm")(x)
        if c.layer_types[self.index] == LINEAR_ATTENTION:
            with jax.named_scope("gated_deltanet"):
                own = None if state is None else jax.tree.map(lambda a: a[cycle], state)
                h, new = GatedDeltaNet(c, self.dtype, name="linear_attn")(h, mask, own)
                state = None if state is None else jax.tree.map(lambda a, n: a.at[cycle].set(n), state, new)
        else:
            with jax.named_scope("attention"):
                h, state = Attention(c, self.dtype, name="self_attn")(h, cos, sin, bias, state, offset, cycle)
        x = x + h
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, c.zero_centered_norm, name="post_attention_layernorm")(x)
        with jax.named_scope("ffn"):
            if c.moe_layers[self.index]:
                h = SparseMoE(c, self.dtype, name="mlp")(h)
            else:
                h = MLP(c.hidden_size, c.intermediate_size, self.dtype, name="mlp")(h)
        return x + h, state


def _embedding(c: TextConfig, dtype: Any) -> nn.Embed:
    init = nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("vocab", "embed"))
    return nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=dtype, embedding_init=init)


def _final_norm(c: TextConfig) -> RMSNorm:
    return RMSNorm(c.hidden_size, c.rms_norm_eps, c.zero_centered_norm)


def _lm_head(c: TextConfig, dtype: Any) -> nn.Dense:
    return Linear(c.vocab_size, ("embed", "vocab"), name=None, dtype=dtype)


def _add_deepstack(x: jax.Array, visual: VisualInputs, layer: jax.Array) -> jax.Array:
    """x + the DeepStack features of decoder layer `layer` (a traced index) on the visual positions."""
    depth = visual.deepstack.shape[0]
    features = jax.lax.dynamic_index_in_dim(visual.deepstack, jnp.minimum(layer, depth - 1), keepdims=False)
    return x + jnp.where(visual.mask[..., None] & (layer < depth), features.astype(x.dtype), 0)


def _run_segment(
    segment: Segment, layer_params: Any, c: TextConfig, dtype: Any, x, cos, sin, bias, mask, state, offset, visual
):
    """`lax.scan` over the segment's repeats; x `[batch, seq, hidden]` and the segment's stacked cache (or None) are
    carried, so each cache update is in place."""
    blocks = [DecoderLayer(c, segment.layer(0, j), dtype) for j in range(segment.period)]
    deepstack = visual is not None and segment.start < visual.deepstack.shape[0]

    def repeat(carry, xs):
        x, state = carry
        params, cycle = xs
        new_state = []
        for j, block in enumerate(blocks):
            with jax.named_scope(f"layer_{j}"):
                layer_state = None if state is None else state[j]
                x, layer_state = block.apply({"params": params[j]}, x, cos, sin, bias, mask, layer_state, offset, cycle)
            new_state.append(layer_state)
            if deepstack:
                x = _add_deepstack(x, visual, segment.start + cycle * segment.period + j)
        return (x, None if state is None else tuple(new_state)), None

    cycles = jnp.arange(segment.count, dtype=jnp.int32)
    (x, state), _ = jax.lax.scan(repeat, (x, state), (layer_params, cycles))
    return x, state


def _decoder(
    params: Any,
    c: TextConfig,
    input_ids: jax.Array,
    positions: jax.Array,
    mask: jax.Array | None,
    cache: Cache | None,
    last_only: bool,
    visual: VisualInputs | None,
) -> tuple[jax.Array, Cache | None]:
    """input_ids `[batch, seq]`, positions `[batch, seq]` or `[3, batch, seq]`, mask `[batch, seq]` (1 = token,
    0 = padding) -> (logits float32, cache).

    Without a cache: logits `[batch, seq, vocab]` of a causal forward over the input alone, and None. With a cache,
    the input continues it from slot `cache.offset`; with `last_only` the logits are those of the last slot only,
    `[batch, vocab]`.
    """
    dtype = compute_dtype(params)
    params = stack_layers(params, c)
    embed = _embedding(c, dtype)
    x = embed.apply({"params": params["embed_tokens"]}, input_ids)
    if visual is not None:
        x = jnp.where(visual.mask[..., None], visual.values.astype(x.dtype), x)
    cos, sin = rotary_tables(positions, c.rope, c.head_dim, dtype)
    batch, seq = input_ids.shape
    valid = jnp.ones((batch, seq), bool) if mask is None else mask.astype(bool)
    segments = layer_segments(c)
    if cache is None:
        slots = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        bias = attention_bias(slots, slots, valid)
        offset, states = None, (None,) * len(segments)
    else:
        offset, states = cache.offset, cache.layers
        key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, offset))
        query_slots = jnp.broadcast_to(offset + jnp.arange(seq), (batch, seq))
        key_slots = jnp.broadcast_to(jnp.arange(key_valid.shape[1]), key_valid.shape)
        bias = attention_bias(query_slots, key_slots, key_valid)
    new_states = []
    for s, segment in enumerate(segments):
        with jax.named_scope(f"segment_{s}"):
            x, state = _run_segment(
                segment, params[STACKED][s], c, dtype, x, cos, sin, bias, mask, states[s], offset, visual
            )
        new_states.append(state)
    if last_only:
        x = x[:, -1]
    x = _final_norm(c).apply({"params": params["norm"]}, x)
    if c.tie_word_embeddings:
        logits = embed.apply({"params": params["embed_tokens"]}, x, method="attend")
    else:
        logits = _lm_head(c, dtype).apply({"params": params["lm_head"]}, x)
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
    params: stacked (as `qwen_jax.load` gives them) or storage layout (stacked here, a copy).
    positions: `[batch, seq]`, `[3, batch, seq]` (MRoPE), or None for text positions from the mask."""
    if positions is None:
        positions = default_positions(attention_mask, input_ids.shape)
    return _decoder(text_params(params), config, input_ids, positions, attention_mask, None, False, visual)[0]


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
    return _decoder(text_params(params), config, input_ids, positions, attention_mask, cache, last_only, visual)


def _example_layer_inputs(config: TextConfig, dtype: Any) -> tuple:
    x = jnp.zeros((1, 1, config.hidden_size), dtype)
    rot = jnp.zeros((1, 1, config.rotary_dim), dtype)
    return x, rot, rot, jnp.zeros((1, 1, 1, 1), jnp.float32), None


def _init_top(config: TextConfig, dtype: Any, key: jax.Array) -> dict:
    """Boxed (logical-axis) parameters of the embedding, final norm and LM head."""
    ids = jnp.zeros((1, 1), jnp.int32)
    x = jnp.zeros((1, 1, config.hidden_size), dtype)
    keys = jax.random.split(key, 3)
    tree = {
        "embed_tokens": _embedding(config, dtype).init(keys[0], ids)["params"],
        "norm": _final_norm(config).init(keys[1], x)["params"],
    }
    if not config.tie_word_embeddings:
        tree["lm_head"] = _lm_head(config, dtype).init(keys[2], x)["params"]
    return tree


def init_params(config: TextConfig, rng: jax.Array, dtype: Any = jnp.float32) -> Any:
    """Random parameters in the stacked layout (logical-axis metadata stripped), initialized like the reference.
    Layer i draws from `fold_in(rng, i)`."""
    top_key, layer_key = jax.random.split(rng)
    params = nn.meta.unbox(_init_top(config, dtype, top_key))
    example = _example_layer_inputs(config, dtype)
    stacked = []
    for segment in layer_segments(config):
        positions = []
        for j in range(segment.period):
            block = DecoderLayer(config, segment.layer(0, j), dtype)
            keys = jnp.stack([jax.random.fold_in(layer_key, segment.layer(c, j)) for c in range(segment.count)])
            init = jax.jit(jax.vmap(lambda key, block=block: nn.meta.unbox(block.init(key, *example)["params"])))
            positions.append(init(keys))
        stacked.append(tuple(positions))
    params[STACKED] = tuple(stacked)
    return params


def _abstract_params(config: TextConfig, dtype: Any) -> Any:
    """The boxed (logical-axis) parameter tree in the storage layout as `jax.ShapeDtypeStruct`s, traced once per
    distinct layer kind so that the cost does not grow with depth."""
    key = jax.random.key(0)
    tree = dict(jax.eval_shape(lambda: _init_top(config, dtype, key)))
    example = _example_layer_inputs(config, dtype)
    kinds: dict = {}
    for i in range(config.num_hidden_layers):
        kind = (config.layer_types[i], config.moe_layers[i])
        if kind not in kinds:
            layer = DecoderLayer(config, i, dtype)
            kinds[kind] = jax.eval_shape(lambda layer=layer: layer.init(key, *example))["params"]
        tree[f"layers_{i}"] = kinds[kind]
    return tree


def param_shapes(config: TextConfig, dtype: Any = jnp.float32) -> Any:
    """The parameter tree (storage layout) as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return nn.meta.unbox(_abstract_params(config, dtype))


def param_logical_axes(config: TextConfig) -> Any:
    """The parameter tree's logical axis names (tuples per leaf, storage layout), for `qwen_jax.sharding`."""
    from qwen_jax.sharding import logical_axes

    return logical_axes(_abstract_params(config, jnp.float32))
