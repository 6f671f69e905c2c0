"""Full causal attention: GQA with q/k RMSNorm before (partial) RoPE.

Qwen3-Next / Qwen3.5 gate the output: `q_proj` yields, per head, the query and a gate of the same width, and the
attention output is multiplied by `sigmoid(gate)` before `o_proj`. Qwen3-VL has no gate.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_jax.config import TextConfig
from qwen_jax.layers.linear import Linear
from qwen_jax.layers.norms import RMSNorm
from qwen_jax.layers.rope import apply_rotary

MASKED = float(jnp.finfo(jnp.float32).min)


def attention_bias(
    query_positions: jax.Array,
    key_positions: jax.Array,
    key_valid: jax.Array,
    query_segments: jax.Array | None = None,
    key_segments: jax.Array | None = None,
) -> jax.Array:
    """Additive float32 bias `[batch, 1, q, k]`: 0 where key k is valid and not after query q, else very negative.

    query_positions `[batch, q]`, key_positions `[batch, k]` are slot indices in the same sequence; key_valid
    `[batch, k]` is False for padding. With segment ids (`[batch, q]`, `[batch, k]`: packed documents), a query
    also sees only the keys of its own segment.
    """
    allowed = (key_positions[:, None, :] <= query_positions[:, :, None]) & key_valid[:, None, :].astype(bool)
    if query_segments is not None:
        allowed &= query_segments[:, :, None] == key_segments[:, None, :]
    return jnp.where(allowed, 0.0, MASKED)[:, None].astype(jnp.float32)


# On CPU, queries attend in blocks of this many (a `lax.map`): each block's [q, k] scores stay in cache through the
# softmax instead of streaming the whole matrix through memory several times. 2048 queries over 2112 keys (8 heads
# of 64, 2 kv heads) took 226 ms in one block, 93-104 ms in blocks of 64-256 and 169 ms in blocks of 512 (2-core
# AMD EPYC). Accelerators take all queries at once.
CPU_QUERY_BLOCK = 128


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Softmax attention in float32. q `[batch, q, heads, dim]`, k/v `[batch, k, kv_heads, dim]`, bias `[batch, 1,
    q, k]` -> `[batch, q, heads, dim]`. Query head i reads kv head `i // (heads / kv_heads)`."""
    b, tq, heads, dim = q.shape
    block = CPU_QUERY_BLOCK if jax.default_backend() == "cpu" else tq
    if tq <= block:
        return _attend(q, k, v, bias)
    pad = (-tq) % block  # padded queries see every key with bias 0 and are dropped
    n = (tq + pad) // block
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, block, heads, dim)
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad), (0, 0)))
    bias = bias.reshape(*bias.shape[:2], n, block, bias.shape[-1])
    out = jax.lax.map(lambda xs: _attend(xs[0], k, v, xs[1]), (jnp.moveaxis(q, 1, 0), jnp.moveaxis(bias, 2, 0)))
    return jnp.moveaxis(out, 0, 1).reshape(b, n * block, heads, dim)[:, :tq]


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    b, tq, heads, dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, tq, kv_heads, heads // kv_heads, dim)
    # Axes in the order the products yield them (batch axes first), so the [q, k] scores are never transposed.
    scores = jnp.einsum("bqhgd,bkhd->bhqgk", q, k, preferred_element_type=jnp.float32) * dim**-0.5
    scores = scores + bias[:, :, :, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqgk,bkhd->bhqgd", probs, v)
    return jnp.moveaxis(out, 1, 2).reshape(b, tq, heads, dim)


def _write_rows(buffer: jax.Array, rows: jax.Array, offset: jax.Array, layer: jax.Array | None) -> jax.Array:
    """Write rows `[batch, seq, ...]` at slot `offset` of buffer `[batch, max_len, ...]` (or `[layers, batch,
    max_len, ...]` at `layer`)."""
    rows, start = rows.astype(buffer.dtype), (0, offset, 0, 0)
    if layer is not None:
        rows, start = rows[None], (layer, *start)
    return jax.lax.dynamic_update_slice(buffer, rows, start)


class Attention(nn.Module):
    """x `[batch, seq, hidden]`, cos/sin `[batch, seq, rotary_dim]` -> (same as x, updated cache).

    Without a cache, bias is `[batch, 1, seq, seq]` over x itself. With `cache` (keys/values `[batch, max_len,
    kv_heads, head_dim]`, or `[layers, batch, ...]` stacked, with this layer at index `layer`), x's keys and values
    are written at slots `offset ...` (in place: only the new rows are written) and the queries attend over the
    layer's whole buffer with bias `[batch, 1, seq, max_len]`.
    """

    config: TextConfig
    dtype: Any

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        bias: jax.Array,
        cache: tuple[jax.Array, jax.Array] | None = None,
        offset: jax.Array | None = None,
        layer: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        c = self.config
        b, t, _ = x.shape
        heads, kv_heads, dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim

        def proj(features, axes, name):
            return Linear(features, axes, name=name, dtype=self.dtype, use_bias=c.attention_bias)

        gated = c.attention_output_gate
        query = proj(heads * dim * (2 if gated else 1), ("embed", "q_heads"), "q_proj")(x)
        query = query.reshape(b, t, heads, 2 * dim if gated else dim)
        q, gate = query[..., :dim], query[..., dim:]
        k = proj(kv_heads * dim, ("embed", "kv_heads"), "k_proj")(x).reshape(b, t, kv_heads, dim)
        v = proj(kv_heads * dim, ("embed", "kv_heads"), "v_proj")(x).reshape(b, t, kv_heads, dim)
        norm = {"eps": c.rms_norm_eps, "zero_centered": c.zero_centered_norm, "axis_name": "head_dim"}
        q = RMSNorm(dim, **norm, name="q_norm")(q)
        k = RMSNorm(dim, **norm, name="k_norm")(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            cache = type(cache)(*(_write_rows(buf, new, offset, layer) for buf, new in zip(cache, (k, v))))
            k, v = (buf if layer is None else buf[layer] for buf in cache)
        out = dot_product_attention(q, k, v, bias)
        out = out.reshape(b, t, heads * dim)
        if gated:
            out = out * jax.nn.sigmoid(gate.reshape(b, t, heads * dim))
        return proj(c.hidden_size, ("q_heads", "embed"), "o_proj")(out), cache
