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
from qwen_jax.layers.fused_projections import fuse_layer
from qwen_jax.layers.gated_deltanet import GatedDeltaNet
from qwen_jax.layers.linear import INIT_STD, Linear, dot_general
from qwen_jax.layers.mlp import MLP
from qwen_jax.layers.moe import SparseMoE, StackedExperts
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
    def __call__(self, x, cos, sin, bias, mask, state=None, offset=None, cycle=None, segment_ids=None, experts=None):
        """`state` is the stacked cache entry of this block's layers (`[count, ...]` leaves; None for a plain
        forward) and `cycle` this layer's index in it; `segment_ids [batch, seq]` mark packed documents (a plain
        forward only); `experts`: the routed experts of a MoE block read from their stack (`StackedExperts`).
        Returns (x, updated stacked state)."""
        c = self.config
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, c.zero_centered_norm, name="input_layernorm")(x)
        if c.layer_types[self.index] == LINEAR_ATTENTION:
            with jax.named_scope("gated_deltanet"):
                own = None if state is None else jax.tree.map(lambda a: a[cycle], state)
                h, new = GatedDeltaNet(c, self.dtype, name="linear_attn")(h, mask, own, segment_ids)
                state = None if state is None else jax.tree.map(lambda a, n: a.at[cycle].set(n), state, new)
        else:
            with jax.named_scope("attention"):
                h, state = Attention(c, self.dtype, name="self_attn")(h, cos, sin, bias, state, offset, cycle)
        x = x + h
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, c.zero_centered_norm, name="post_attention_layernorm")(x)
        with jax.named_scope("ffn"):
            if c.moe_layers[self.index]:
                h = SparseMoE(c, self.dtype, name="mlp")(h, experts)
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


class DecoderOutputs(NamedTuple):
    """`hidden [batch, seq, hidden]`: the final-normed hidden states (compute dtype), to be multiplied by
    `output_weights`; `router_logits [moe_layers, batch * seq, experts]` float32 in layer order (None when not
    collected or for dense models)."""

    hidden: jax.Array
    router_logits: jax.Array | None


def _run_segment(segment: Segment, layer_params: Any, c: TextConfig, dtype: Any, x, inputs: dict, state, collect):
    """`lax.scan` over the segment's repeats; x `[batch, seq, hidden]` and the segment's stacked cache (or None) are
    carried, so each cache update is in place. `inputs`: what every layer reads (rotary tables, bias, mask, cache
    offset, visual inputs, segment ids, remat). With `collect`, also returns the router logits of the segment's MoE
    positions, `[count, tokens, experts]` each."""
    blocks = [DecoderLayer(c, segment.layer(0, j), dtype) for j in range(segment.period)]
    visual = inputs["visual"]
    deepstack = visual is not None and segment.start < visual.deepstack.shape[0]
    args = (inputs["cos"], inputs["sin"], inputs["bias"], inputs["mask"])
    # With a cache (inference), MoE blocks read their routed experts in place from the whole stack
    # (`StackedExperts`): the scan's slice of them would be a copy of every expert at every step.
    stacks = [None] * segment.period
    if state is not None:
        stacks = [
            params["mlp"].get("experts") if isinstance(params.get("mlp"), dict) else None for params in layer_params
        ]
        layer_params = tuple(
            params if s is None else dict(params, mlp={k: v for k, v in params["mlp"].items() if k != "experts"})
            for params, s in zip(layer_params, stacks)
        )

    def repeat(carry, xs):
        x, state = carry
        params, cycle = xs
        new_state, router = [], []
        for j, block in enumerate(blocks):
            with jax.named_scope(f"layer_{j}"):
                layer_state = None if state is None else state[j]
                variables = {"params": params[j]}
                experts = None if stacks[j] is None else StackedExperts(**stacks[j], layer=cycle)
                call = (x, *args, layer_state, inputs["offset"], cycle, inputs["segment_ids"], experts)
                if collect and c.moe_layers[block.index]:
                    (x, layer_state), sown = block.apply(variables, *call, mutable=["intermediates"])
                    router.append(sown["intermediates"]["mlp"]["router_logits"][0])
                else:
                    x, layer_state = block.apply(variables, *call)
            new_state.append(layer_state)
            if deepstack:
                x = _add_deepstack(x, visual, segment.start + cycle * segment.period + j)
        return (x, None if state is None else tuple(new_state)), tuple(router)

    if inputs["remat"]:
        repeat = jax.checkpoint(repeat, prevent_cse=False)
    cycles = jnp.arange(segment.count, dtype=jnp.int32)
    unroll = segment.count if c.unroll_loops else 1
    (x, state), router = jax.lax.scan(repeat, (x, state), (layer_params, cycles), unroll=unroll)
    return x, state, router


def _decoder_hidden(
    params: Any,
    c: TextConfig,
    input_ids: jax.Array,
    positions: jax.Array,
    mask: jax.Array | None,
    cache: Cache | None,
    visual: VisualInputs | None,
    segment_ids: jax.Array | None = None,
    remat: bool = False,
    collect_router_logits: bool = False,
) -> tuple[jax.Array, Cache | None, jax.Array | None]:
    """input_ids `[batch, seq]`, positions `[batch, seq]` or `[3, batch, seq]`, mask `[batch, seq]` (1 = token,
    0 = padding) -> (hidden states before the final norm `[batch, seq, hidden]`, cache, router logits).

    Without a cache: a causal forward over the input alone (with `segment_ids`, over each packed document alone).
    With a cache, the input continues it from slot `cache.offset`.
    """
    if segment_ids is not None and cache is not None:
        raise ValueError("segment_ids (packed documents) are for a forward without a cache")
    dtype = compute_dtype(params)
    params = stack_layers(params, c)
    x = _embedding(c, dtype).apply({"params": params["embed_tokens"]}, input_ids)
    if visual is not None:
        x = jnp.where(visual.mask[..., None], visual.values.astype(x.dtype), x)
    cos, sin = rotary_tables(positions, c.rope, c.head_dim, dtype)
    batch, seq = input_ids.shape
    if mask is None and segment_ids is not None:
        mask = segment_ids > 0
    valid = jnp.ones((batch, seq), bool) if mask is None else mask.astype(bool)
    segments = layer_segments(c)
    if len(params[STACKED]) != len(segments):
        raise ValueError(
            f"the parameters are stacked in {len(params[STACKED])} segments, the config's layers in {len(segments)}: "
            f"they were stacked for another scan_layers (this config has scan_layers={c.scan_layers})"
        )
    if cache is None:
        slots = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        bias = attention_bias(slots, slots, valid, segment_ids, segment_ids)
        offset, states = None, (None,) * len(segments)
    else:
        offset, states = cache.offset, cache.layers
        key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, offset))
        query_slots = jnp.broadcast_to(offset + jnp.arange(seq), (batch, seq))
        key_slots = jnp.broadcast_to(jnp.arange(key_valid.shape[1]), key_valid.shape)
        bias = attention_bias(query_slots, key_slots, key_valid)
    inputs = {"cos": cos, "sin": sin, "bias": bias, "mask": mask, "offset": offset, "visual": visual}
    inputs.update(segment_ids=segment_ids, remat=remat)
    new_states, routers = [], []
    for s, segment in enumerate(segments):
        with jax.named_scope(f"segment_{s}"):
            x, state, router = _run_segment(
                segment, params[STACKED][s], c, dtype, x, inputs, states[s], collect_router_logits
            )
        new_states.append(state)
        moe_positions = [j for j in range(segment.period) if c.moe_layers[segment.layer(0, j)]]
        for j, logits in zip(moe_positions, router):
            routers += [(segment.layer(cycle, j), logits[cycle]) for cycle in range(segment.count)]
    router_logits = jnp.stack([r for _, r in sorted(routers, key=lambda r: r[0])]) if routers else None
    new_cache = None if cache is None else Cache(tuple(new_states), offset + seq, key_valid)
    return x, new_cache, router_logits


def output_weights(params: Any, config: TextConfig) -> jax.Array:
    """The LM head as `[hidden, vocab]`: the `lm_head` kernel, or the transposed embedding when tied."""
    if config.tie_word_embeddings:
        return params["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


def _logits(params: Any, c: TextConfig, hidden: jax.Array) -> jax.Array:
    """Final-normed hidden states `[..., hidden]` -> float32 logits `[..., vocab]`."""
    if c.tie_word_embeddings:  # hidden @ embedding^T
        embedding = params["embed_tokens"]["embedding"].astype(hidden.dtype)
        logits = dot_general(hidden, embedding, (((hidden.ndim - 1,), (1,)), ((), ())))
    else:
        logits = _lm_head(c, hidden.dtype).apply({"params": params["lm_head"]}, hidden)
    return logits.astype(jnp.float32)


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
    """(logits float32, cache): logits `[batch, seq, vocab]`, or with `last_only` those of the last slot,
    `[batch, vocab]`. See `_decoder_hidden` for the arguments."""
    x, new_cache, _ = _decoder_hidden(params, c, input_ids, positions, mask, cache, visual)
    if last_only:
        x = x[:, -1]
    x = _final_norm(c).apply({"params": params["norm"]}, x)
    return _logits(params, c, x), new_cache


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


def decoder_outputs(
    params: Any,
    config: TextConfig,
    input_ids: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    visual: VisualInputs | None = None,
    remat: bool = False,
) -> DecoderOutputs:
    """The training forward: final-normed hidden states and router logits, without the `[batch, seq, vocab]`
    logits (a chunked loss multiplies by `output_weights` piece by piece).

    input_ids `[batch, seq]`; positions `[batch, seq]` / `[3, batch, seq]` (None: 0, 1, ... per row, or per
    segment); segment_ids `[batch, seq]`: 1, 2, ... per packed document, 0 = padding; attention, the causal conv
    and the delta-net state never cross a segment boundary, so a packed row computes what each document computes
    alone. `remat`: recompute each repeat of the layer pattern in the backward pass instead of storing it."""
    if positions is None:
        positions = default_positions(None, input_ids.shape) if segment_ids is None else segment_positions(segment_ids)
    params = text_params(params)
    x, _, router_logits = _decoder_hidden(
        params, config, input_ids, positions, None, None, visual, segment_ids, remat, collect_router_logits=True
    )
    return DecoderOutputs(_final_norm(config).apply({"params": params["norm"]}, x), router_logits)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions `[batch, seq]` that restart at 0 at each segment's first token (0 on padding)."""
    seq = segment_ids.shape[1]
    index = jnp.arange(seq, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return jnp.where(segment_ids > 0, index - start_index, 0)


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
            positions.append(fuse_layer(init(keys), config))
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


def stacked_param_logical_axes(config: TextConfig) -> Any:
    """Logical axis names of the stacked layout (`qwen_jax.stacking`): each stacked leaf gets a leading, never
    split, layer axis."""
    from qwen_jax.layers.fused_projections import fuse_layer_names
    from qwen_jax.stacking import stacked_logical_axes

    names = param_logical_axes(config)
    out = {k: v for k, v in names.items() if not k.startswith("layers_")}
    out[STACKED] = tuple(
        tuple(stacked_logical_axes(fuse_layer_names(names[f"layers_{s.layer(0, j)}"])) for j in range(s.period))
        for s in layer_segments(config)
    )
    return out


def stacked_param_shardings(params: Any, config: TextConfig, mesh: Any) -> Any:
    """`NamedSharding`s on `mesh` for stacked text parameters (arrays or shape structs), from their logical axes."""
    from qwen_jax.sharding import tree_shardings

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return tree_shardings(abstract, stacked_param_logical_axes(config), mesh)


def abstract_params(config: TextConfig, dtype: Any, mesh: Any = None, vision: Any = None) -> Any:
    """The stacked parameter tree as `jax.ShapeDtypeStruct`s (with their `NamedSharding`s on `mesh`, if given),
    allocating nothing; `vision` (a `VisionConfig`) adds the vision tower under "visual". `A_log`, `dt_bias` and
    norm weights are float32 whatever `dtype`, as `qwen_jax.load` gives them."""
    from qwen_jax.checkpoint.format import cast_tree
    from qwen_jax.sharding import tree_shardings

    shapes = param_shapes(config, jnp.float32)
    names = stacked_param_logical_axes(config)
    if vision is not None:
        from qwen_jax.vision import vision_logical_axes, vision_param_shapes

        shapes["visual"] = vision_param_shapes(vision, jnp.float32)
        names["visual"] = vision_logical_axes(vision)
    shapes = jax.eval_shape(lambda tree: stack_layers(cast_tree(tree, jnp.dtype(dtype)), config), shapes)
    if mesh is None:
        return shapes
    shardings = tree_shardings(shapes, names, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
