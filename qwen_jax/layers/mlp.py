"""SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from qwen_jax.layers.linear import Linear


class MLP(nn.Module):
    """x: [..., hidden] -> [..., hidden]."""

    hidden_size: int
    intermediate_size: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gate = Linear(self.intermediate_size, ("embed", "mlp"), name="gate_proj", dtype=self.dtype)(x)
        up = Linear(self.intermediate_size, ("embed", "mlp"), name="up_proj", dtype=self.dtype)(x)
        return Linear(self.hidden_size, ("mlp", "embed"), name="down_proj", dtype=self.dtype)(jax.nn.silu(gate) * up)
