"""Rotary position embedding: partial rotation, the interleaved MRoPE layout, and YaRN scaling.

Only the first `rotary_dim = head_dim * partial_rotary_factor` features of each head rotate, in the NeoX
"rotate half" layout. With MRoPE, frequency slot i reads the temporal, height or width position row (interleaved
`THWTHW...`); for text all three rows are equal, which reduces to plain partial RoPE.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import RopeConfig, yarn_attention_factor


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """The `[rotary_dim / 2]` float32 inverse frequencies and the cos/sin scale (1 unless YaRN)."""
    dim = int(head_dim * rope.partial_rotary_factor)
    # float32 throughout, as the reference computes them; the power itself in float64, rounded once to float32: the
    # reference's float32 pow is accurate to about half an ulp, numpy's float32 power is not (up to 2-3 ulp apart).
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float64(rope.theta), exponents.astype(np.float64)).astype(np.float32)
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if rope.rope_type != "yarn":
        return inv_freq, 1.0

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = np.float32(1) - ramp
    interpolation = (np.float32(1.0) / (np.float32(rope.factor) * pos_freqs)).astype(np.float32)
    inv_freq = interpolation * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq.astype(np.float32), float(yarn_attention_factor(rope))


def mrope_axis_of_slot(section: tuple[int, ...] | None, num_slots: int) -> np.ndarray:
    """For each frequency slot, the position row it reads: 0 = temporal, 1 = height, 2 = width."""
    axis = np.zeros(num_slots, dtype=np.int32)
    if section is None:
        return axis
    for row, offset in ((1, 1), (2, 2)):
        axis[offset : section[row] * 3 : 3] = row
    return axis


def rotary_tables(
    positions: jax.Array, rope: RopeConfig, head_dim: int, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables `[batch, seq, rotary_dim]` in `dtype`.

    positions: `[batch, seq]` (text) or `[3, batch, seq]` (temporal, height, width rows).
    """
    inv_freq, scale = inverse_frequencies(rope, head_dim)
    if positions.ndim == 2:
        positions = jnp.broadcast_to(positions[None], (3, *positions.shape))
    axis = mrope_axis_of_slot(rope.mrope_section, inv_freq.shape[0])
    # [batch, seq, slots]: slot i takes position row axis[i].
    pos = jnp.moveaxis(positions, 0, -1)[..., axis].astype(jnp.float32)
    freqs = pos * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first `rotary_dim` features of x `[batch, seq, heads, head_dim]` (cos/sin: `[batch, seq, rot]`)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1).astype(x.dtype)
