"""RMS norms. All normalize in float32.

- Qwen3-Next / Qwen3.5 decoder norms (and q/k norms) are zero-centred: `(normalize(x) * (1 + w))`, w initialized to
  zeros, cast to the input dtype at the end.
- Qwen3-VL's decoder norms, and the gated norm on the delta-net output, use a plain `w * normalize(x)` (w initialized
  to ones), with the normalized value cast to the input dtype first.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """`x / rms(x)` over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, zero_centered: bool) -> jax.Array:
    """RMSNorm of x `[..., dim]` with weight `[dim]`, in x's dtype."""
    if zero_centered:
        return (rms_normalize(x, eps) * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return (weight * rms_normalize(x, eps).astype(x.dtype)).astype(x.dtype)


class RMSNorm(nn.Module):
    """x: [..., dim] -> same shape and dtype."""

    dim: int
    eps: float = 1e-6
    zero_centered: bool = True
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros_init() if self.zero_centered else nn.initializers.ones_init()
        w = self.param("weight", nn.with_logical_partitioning(init, (self.axis_name,)), (self.dim,), jnp.float32)
        return rms_norm(x, w, self.eps, self.zero_centered)


class GatedRMSNorm(nn.Module):
    """`w * normalize(x)` then `* silu(z)` in float32, per head. x, z: [..., heads, head_dim]; w: [head_dim]."""

    dim: int
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        w = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                       (self.dim,), jnp.float32)  # fmt: skip
        out = w * rms_normalize(x, self.eps).astype(x.dtype)
        return (out * jax.nn.silu(z.astype(jnp.float32))).astype(x.dtype)
