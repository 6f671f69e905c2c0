"""Sparse mixture of experts with a sigmoid-gated shared expert (Qwen3-Next / Qwen3.5-MoE).

Router: float32 softmax over `x @ gate`, top-k, renormalized (always for Qwen3.5; per `norm_topk_prob` for Qwen3-Next).
Dispatch here is the plain single-device one: token copies sorted by expert and two grouped matmuls
(`lax.ragged_dot`), so each token only pays for its k experts.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_jax.config import TextConfig
from qwen_jax.layers.linear import INIT_STD, Linear
from qwen_jax.layers.mlp import MLP


def route(logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """logits `[tokens, experts]` -> (weights `[tokens, k]` float32, expert ids `[tokens, k]`)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def routed_experts(
    x: jax.Array, weights: jax.Array, experts: jax.Array, gate_up: jax.Array, down: jax.Array
) -> jax.Array:
    """Sum over the k chosen experts of `weight * down(silu(gate(x)) * up(x))`.

    x `[tokens, hidden]`, weights/experts `[tokens, k]`, gate_up `[experts, hidden, 2 * inter]` (gate then up),
    down `[experts, inter, hidden]` -> `[tokens, hidden]`.
    """
    tokens, k = experts.shape
    num_experts, _, two_inter = gate_up.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = x[order // k]
    h = jax.lax.ragged_dot(xs, gate_up.astype(x.dtype), group_sizes)
    h = jax.nn.silu(h[:, : two_inter // 2]) * h[:, two_inter // 2 :]
    ys = jax.lax.ragged_dot(h, down.astype(x.dtype), group_sizes)
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(tokens, k, -1)
    return jnp.einsum("tkh,tk->th", y.astype(jnp.float32), weights.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


class SparseMoE(nn.Module):
    """x `[batch, seq, hidden]` -> same."""

    config: TextConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = Linear(c.num_experts, ("embed", "expert"), name="gate", dtype=self.dtype)(x)
        weights, experts = route(logits, c.num_experts_per_tok, c.norm_topk_prob)
        params = ExpertWeights(c.num_experts, c.hidden_size, c.moe_intermediate_size, self.dtype, name="experts")()
        out = routed_experts(x, weights, experts, *params)
        if c.shared_expert_intermediate_size:
            shared = MLP(c.hidden_size, c.shared_expert_intermediate_size, self.dtype, name="shared_expert")(x)
            shared_gate = Linear(1, ("embed", None), name="shared_expert_gate", dtype=self.dtype)(x)
            out = out + jax.nn.sigmoid(shared_gate) * shared
        return out.reshape(shape)


class ExpertWeights(nn.Module):
    """The stacked expert weights: gate_up_proj `[experts, hidden, 2 * inter]`, down_proj `[experts, inter, hidden]`."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    dtype: Any

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        init = nn.initializers.normal(INIT_STD)
        gate_up = self.param(
            "gate_up_proj",
            nn.with_logical_partitioning(init, ("expert", "embed", "expert_mlp")),
            (self.num_experts, self.hidden_size, 2 * self.intermediate_size),
            self.dtype,
        )
        down = self.param(
            "down_proj",
            nn.with_logical_partitioning(init, ("expert", "expert_mlp", "embed")),
            (self.num_experts, self.intermediate_size, self.hidden_size),
            self.dtype,
        )
        return gate_up, down
