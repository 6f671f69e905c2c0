"""RMS norms of the Qwen3-Next / Qwen3.5 text stack.

Both normalize in float32. The decoder norms (and q/k norms) are zero-centred: `x * (1 + w)`, `w` initialized to zeros.
The gated norm on the delta-net output uses a plain `w` (initialized to ones), then gates with `silu(z)`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """`x / rms(x)` over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: `normalize(x) * (1 + w)` in float32, cast back to the input dtype. x: [..., dim]."""

    dim: int
    eps: float = 1e-6
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param(
            "weight",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axis_name,)),
            (self.dim,),
            jnp.float32,
        )
        return (rms_normalize(x, self.eps) * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


class GatedRMSNorm(nn.Module):
    """`w * normalize(x)` then `* silu(z)`, per head. x, z: [..., heads, head_dim]; w: [head_dim]."""

    dim: int
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        w = self.param(
            "weight", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (self.dim,), jnp.float32
        )
        out = w * rms_normalize(x, self.eps).astype(x.dtype)
        return (out * jax.nn.silu(z.astype(jnp.float32))).astype(x.dtype)
