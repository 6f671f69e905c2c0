"""Sparse mixture of experts, with a sigmoid-gated shared expert for Qwen3-Next / Qwen3.5-MoE (Qwen3-VL-MoE has none).

Router: float32 softmax over `x @ gate`, top-k, renormalized (always for Qwen3.5 and Qwen3-VL; per `norm_topk_prob`
for Qwen3-Next). Dispatch is dropless: token copies sorted by expert and two grouped matmuls
(`qwen_jax.layers.grouped_matmul`: `lax.ragged_dot` on TPU and GPU, a tiled scan on CPU), so each token pays for
its k experts only.

Expert parallelism (a mesh with an `expert` axis): each device holds `experts / n` whole experts and runs the dispatch
under `shard_map` for its own experts only; copies routed elsewhere contribute zero, and a `psum` over the expert axis
adds the partial outputs. Tokens are split over the batch axes (data, fsdp) and replicated across the expert axis, so
this exchange is one all-reduce of the layer output per step. It is the right exchange for decode and for small
prefill batches, where an all-to-all of `k` copies per token would move more data and add latency; an all-to-all
dispatch pays off only when tokens are also split over the expert axis at large prefill batches.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_jax.config import TextConfig
from qwen_jax.layers.grouped_matmul import grouped_matmul
from qwen_jax.layers.linear import INIT_STD, Linear
from qwen_jax.layers.mlp import MLP


def route(logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """logits `[tokens, experts]` -> (weights `[tokens, k]` float32, expert ids `[tokens, k]`)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


# Up to this many token copies (tokens x k), and fewer than the experts held, each copy reads its own expert's
# weights (decode): the bytes read grow with k, not with the number of experts.
SMALL_BATCH_COPIES = 64


def routed_experts(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate_up: jax.Array,
    down: jax.Array,
    first_expert: jax.Array | int = 0,
) -> jax.Array:
    """Sum over the k chosen experts of `weight * down(silu(gate(x)) * up(x))`, counting only the experts held here:
    `first_expert ... first_expert + len(gate_up) - 1` (all of them on one device).

    x `[tokens, hidden]`, weights/experts `[tokens, k]`, gate_up `[local_experts, hidden, 2 * inter]` (gate then
    up), down `[local_experts, inter, hidden]` -> `[tokens, hidden]`.
    """
    tokens, k = experts.shape
    local_experts, _, two_inter = gate_up.shape
    local = experts.reshape(-1) - first_expert
    held = (local >= 0) & (local < local_experts)
    gate_up, down = gate_up.astype(x.dtype), down.astype(x.dtype)
    if tokens * k <= SMALL_BATCH_COPIES and tokens * k < local_experts:
        index = jnp.where(held, local, 0)
        pick = lambda w: jnp.stack([jax.lax.dynamic_index_in_dim(w, i, keepdims=False) for i in index])  # noqa: E731
        copies = jnp.repeat(x, k, axis=0)
        h = jnp.einsum("nh,nhf->nf", copies, pick(gate_up))
        h = jax.nn.silu(h[:, : two_inter // 2]) * h[:, two_inter // 2 :]
        y = jnp.where(held[:, None], jnp.einsum("ni,nih->nh", h, pick(down)), 0)
    else:
        # Copies for experts held elsewhere sort last, into a group that no matmul reads.
        local = jnp.where(held, local, local_experts)
        order = jnp.argsort(local, stable=True)
        group_sizes = jnp.bincount(local, length=local_experts + 1)[:local_experts].astype(jnp.int32)
        h = grouped_matmul(x[order // k], gate_up, group_sizes)
        h = jax.nn.silu(h[:, : two_inter // 2]) * h[:, two_inter // 2 :]
        ys = jnp.where(held[order][:, None], grouped_matmul(h, down, group_sizes), 0)
        y = jnp.zeros_like(ys).at[order].set(ys)
    y = y.reshape(tokens, k, -1).astype(jnp.float32)
    return jnp.einsum("tkh,tk->th", y, weights.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


GATE_UP_AXES = ("expert", "embed", None)
DOWN_AXES = ("expert", None, "embed")


def expert_parallel(
    x: jax.Array, weights: jax.Array, experts: jax.Array, gate_up: jax.Array, down: jax.Array
) -> jax.Array:
    """`routed_experts` over the current mesh (`jax.set_mesh`): expert-parallel under `shard_map` when the mesh
    has more than one device, plain otherwise."""
    from jax.sharding import PartitionSpec as P

    from qwen_jax.sharding import BATCH_AXES, spec_for

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return routed_experts(x, weights, experts, gate_up, down)
    batch = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
    gate_up_spec = spec_for(gate_up.shape, GATE_UP_AXES, mesh, "gate_up_proj")
    down_spec = spec_for(down.shape, DOWN_AXES, mesh, "down_proj")
    tokens = P(batch, None)

    def local(x, weights, experts, gate_up, down):
        # Weights split over fsdp on the hidden dimension are gathered before use (FSDP).
        if gate_up_spec[1] is not None:
            gate_up = jax.lax.all_gather(gate_up, gate_up_spec[1], axis=1, tiled=True)
        if down_spec[2] is not None:
            down = jax.lax.all_gather(down, down_spec[2], axis=2, tiled=True)
        first = jax.lax.axis_index("expert") * gate_up.shape[0] if mesh.shape["expert"] > 1 else 0
        out = routed_experts(x, weights, experts, gate_up, down, first)
        return jax.lax.psum(out, "expert") if mesh.shape["expert"] > 1 else out

    return jax.shard_map(
        local,
        in_specs=(tokens, tokens, tokens, gate_up_spec, down_spec),
        out_specs=tokens,
        check_vma=False,
    )(x, weights, experts, gate_up, down)


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
        self.sow("intermediates", "router_logits", logits.astype(jnp.float32))  # [tokens, experts], for the aux loss
        weights, experts = route(logits, c.num_experts_per_tok, c.norm_topk_prob)
        params = ExpertWeights(c.num_experts, c.hidden_size, c.moe_intermediate_size, self.dtype, name="experts")()
        out = expert_parallel(x, weights, experts, *params)
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
            nn.with_logical_partitioning(init, GATE_UP_AXES),
            (self.num_experts, self.hidden_size, 2 * self.intermediate_size),
            self.dtype,
        )
        down = self.param(
            "down_proj",
            nn.with_logical_partitioning(init, DOWN_AXES),
            (self.num_experts, self.intermediate_size, self.hidden_size),
            self.dtype,
        )
        return gate_up, down
