"""SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`; gate and up are one matmul in the stacked layout
(`qwen_jax.layers.fused_projections`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from qwen_jax.layers.fused_projections import GATE_UP_NAME, deinterleave_gate_up
from qwen_jax.layers.linear import Linear


class MLP(nn.Module):
    """x: [..., hidden] -> [..., hidden]."""

    hidden_size: int
    intermediate_size: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.has_variable("params", GATE_UP_NAME):  # the layout the model computes with (`fused_projections`)
            fused = Linear(2 * self.intermediate_size, ("embed", "mlp"), name=GATE_UP_NAME, dtype=self.dtype)(x)
            gate, up = deinterleave_gate_up(fused)
        else:  # the storage layout (also what `init` creates)
            gate = Linear(self.intermediate_size, ("embed", "mlp"), name="gate_proj", dtype=self.dtype)(x)
            up = Linear(self.intermediate_size, ("embed", "mlp"), name="up_proj", dtype=self.dtype)(x)
        return Linear(self.hidden_size, ("mlp", "embed"), name="down_proj", dtype=self.dtype)(jax.nn.silu(gate) * up)
