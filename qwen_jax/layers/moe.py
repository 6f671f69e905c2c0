"""Sparse mixture of experts, with a sigmoid-gated shared expert for Qwen3-Next / Qwen3.5-MoE (Qwen3-VL-MoE has none).

Router: float32 softmax over `x @ gate`, top-k, renormalized (always for Qwen3.5 and Qwen3-VL; per `norm_topk_prob`
for Qwen3-Next). Dispatch is dropless: token copies sorted by expert and two grouped matmuls
(`qwen_jax.layers.grouped_matmul`: `lax.ragged_dot` on TPU and GPU, a tiled scan on CPU), so each token pays for
its k experts only.

Expert parallelism (a mesh with an `expert` axis of n devices): each device holds `experts / n` whole experts and
runs the dispatch under `shard_map` for its own experts only. Tokens are split over the batch axes (data, fsdp) and
replicated across the expert axis, and the token exchange is chosen per call from its size (`choose_exchange`):
- all-reduce (decode, small batches): every device computes its experts' share for all tokens, copies routed
  elsewhere contribute zero, and a `psum` adds the partial outputs: one collective of `tokens x hidden`, the least
  latency.
- all-to-all (prefill, large batches, when n > 2k): each device takes `tokens / n` of the tokens, sends each copy
  to the device holding its expert (`ragged_all_to_all`), gets the results back the same way and all-gathers the
  outputs. It moves `2 k tokens / n + tokens` rows per device instead of the all-reduce's `2 tokens`, so it pays
  off once n > 2k and the rows are many enough to amortize three collectives instead of one.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_jax.config import TextConfig
from qwen_jax.layers.grouped_matmul import group_matrix, grouped_ffn
from qwen_jax.layers.linear import INIT_STD, Linear
from qwen_jax.layers.mlp import MLP
from qwen_jax.layers.ragged_exchange import ragged_all_to_all


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


class StackedExperts(NamedTuple):
    """A MoE layer's routed experts read in place from the stack of all its repeats (inference): gate_up_proj
    `[count, experts, hidden, 2 * inter]`, down_proj `[count, experts, inter, hidden]`, and `layer`, this layer's
    index in them.
    Slicing a layer's `[experts, ...]` out of the stacked parameters would copy every expert of it at each step
    (a loop over tiles cannot read through a slice); indexing (layer, expert) where a matrix is used copies nothing."""

    gate_up_proj: jax.Array
    down_proj: jax.Array
    layer: jax.Array


def routed_experts(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate_up: jax.Array,
    down: jax.Array,
    first_expert: jax.Array | int = 0,
    layer: jax.Array | None = None,
) -> jax.Array:
    """Sum over the k chosen experts of `weight * down(silu(gate(x)) * up(x))`, counting only the experts held here:
    `first_expert ... first_expert + local_experts - 1` (all of them on one device).

    x `[tokens, hidden]`, weights/experts `[tokens, k]`, gate_up `[local_experts, hidden, 2 * inter]` (gate then
    up), down `[local_experts, inter, hidden]` -> `[tokens, hidden]`. With `layer`, gate_up and down have a leading
    layer axis (`StackedExperts`) and layer `layer` is used.
    """
    tokens, k = experts.shape
    local_experts, _, two_inter = gate_up.shape[-3:]
    local = jnp.asarray(experts).reshape(-1) - first_expert
    held = (local >= 0) & (local < local_experts)
    if tokens * k <= SMALL_BATCH_COPIES and tokens * k < local_experts:
        index = jnp.where(held, local, 0)
        pick = lambda w: jnp.stack([group_matrix(w, i, layer, x.dtype) for i in index])  # noqa: E731
        copies = jnp.repeat(x, k, axis=0)
        h = jnp.einsum("nh,nhf->nf", copies, pick(gate_up))
        h = jax.nn.silu(h[:, : two_inter // 2]) * h[:, two_inter // 2 :]
        y = jnp.where(held[:, None], jnp.einsum("ni,nih->nh", h, pick(down)), 0)
    else:
        y = _grouped_ffn(x, jnp.arange(tokens * k) // k, local, held, gate_up, down, layer)
    return _combine(y, weights, x.dtype)


def _combine(y: jax.Array, weights: jax.Array, dtype) -> jax.Array:
    """Expert outputs of the copies `[tokens * k, hidden]` weighted and summed per token -> `[tokens, hidden]`."""
    tokens, k = weights.shape
    y = y.reshape(tokens, k, -1).astype(jnp.float32)
    return jnp.einsum("tkh,tk->th", y, weights.astype(dtype).astype(jnp.float32)).astype(dtype)


def _grouped_ffn(
    x: jax.Array,
    source: jax.Array,
    local: jax.Array,
    held: jax.Array,
    gate_up: jax.Array,
    down: jax.Array,
    layer: jax.Array | None = None,
) -> jax.Array:
    """The expert FFN of rows `x[source]` `[rows]` by their local expert `local [rows]`, sorted into groups for two
    grouped matmuls; rows not `held` here give zeros. -> `[rows, hidden]` in the order of `source`."""
    local_experts, _, two_inter = gate_up.shape[-3:]
    # Rows for experts held elsewhere sort last, into a group that no matmul reads.
    local = jnp.where(held, local, local_experts)
    order = jnp.argsort(local, stable=True)
    group_sizes = jnp.bincount(local, length=local_experts + 1)[:local_experts].astype(jnp.int32)
    swiglu = lambda h: jax.nn.silu(h[:, : two_inter // 2]) * h[:, two_inter // 2 :]
    ys = jnp.where(held[order][:, None], grouped_ffn(x[source[order]], gate_up, down, group_sizes, swiglu, layer), 0)
    return ys[jnp.argsort(order)]  # back to the order of `source` (a gather: cheaper than a scatter on CPU)


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def all_to_all_experts(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate_up: jax.Array,
    down: jax.Array,
    axis_name: str,
    layer: jax.Array | None = None,
) -> jax.Array:
    """`routed_experts` with the token copies sent to the devices that hold their experts (inside `shard_map`).

    x `[tokens, hidden]`, weights/experts `[tokens, k]`, replicated over `axis_name` (n devices, `tokens` a
    multiple of n); gate_up/down: this device's experts, `len(gate_up)` consecutive ones per device. Device i takes
    tokens `i * tokens / n ...`, sorts their copies by expert (so by destination), sends each device the copies
    for its experts (`ragged_all_to_all`), runs its grouped FFN on what it receives, sends the results back the
    same way, combines them per token, and all-gathers the tokens' outputs -> `[tokens, hidden]`, replicated.
    `layer`: as in `routed_experts`.
    """
    tokens, k = experts.shape
    n, i = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    if tokens % n:
        raise ValueError(f"the all-to-all exchange needs tokens ({tokens}) divisible by the {axis_name} axis ({n})")
    local_experts = gate_up.shape[-3]
    mine = tokens // n
    x_mine, w_mine, e_mine = (jax.lax.dynamic_slice_in_dim(a, i * mine, mine) for a in (x, weights, experts))
    copies = e_mine.reshape(-1).astype(jnp.int32)  # [mine * k] global expert ids
    order = jnp.argsort(copies, stable=True)  # by expert, so by destination device
    send_sizes = jnp.bincount(copies // local_experts, length=n).astype(jnp.int32)
    sizes = jax.lax.all_gather(send_sizes, axis_name)  # [sender, destination]
    sent_from = _exclusive_cumsum(sizes, axis=1)  # where each sender's rows for each destination start
    arrive_at = _exclusive_cumsum(sizes, axis=0)  # where they land at the destination
    recv_sizes = sizes[:, i]
    capacity = tokens * k  # every copy of every device to this one
    exchange = functools.partial(ragged_all_to_all, axis_name=axis_name)

    rows = exchange(x_mine[order // k], jnp.zeros((capacity, x.shape[1]), x.dtype), sent_from[i], send_sizes,
                    arrive_at[i], recv_sizes)  # fmt: skip
    # Rows past what arrived keep the fill: an expert id no device holds.
    ids = exchange(copies[order], jnp.full((capacity,), n * local_experts, jnp.int32), sent_from[i], send_sizes,
                   arrive_at[i], recv_sizes)  # fmt: skip
    local = ids - i * local_experts
    held = (local >= 0) & (local < local_experts)
    y = _grouped_ffn(rows, jnp.arange(capacity), local, held, gate_up, down, layer)
    # Back: the rows from sender s sit at arrive_at[s, i]; they return to s's sorted copies at sent_from[s, i].
    back = exchange(y, jnp.zeros((mine * k, x.shape[1]), x.dtype), arrive_at[:, i], recv_sizes, sent_from[:, i],
                    send_sizes)  # fmt: skip
    out_mine = _combine(jnp.zeros_like(back).at[order].set(back), w_mine, x.dtype)
    return jax.lax.all_gather(out_mine, axis_name, tiled=True)


GATE_UP_AXES = ("expert", "embed", None)
DOWN_AXES = ("expert", None, "embed")


# The all-to-all exchange needs at least this many tokens per device of the expert axis.
ALL_TO_ALL_MIN_TOKENS_PER_DEVICE = 32
EXCHANGES = ("all_reduce", "all_to_all")


def choose_exchange(tokens: int, k: int, n: int) -> str:
    """The token exchange for `tokens` (per batch shard) with top-`k` routing over an expert axis of `n` (see the
    module docstring)."""
    if n > 2 * k and tokens % n == 0 and tokens // n >= ALL_TO_ALL_MIN_TOKENS_PER_DEVICE:
        return "all_to_all"
    return "all_reduce"


def expert_parallel(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate_up: jax.Array,
    down: jax.Array,
    exchange: str | None = None,
    layer: jax.Array | None = None,
) -> jax.Array:
    """`routed_experts` over the current mesh (`jax.set_mesh`): expert-parallel under `shard_map` when the mesh
    has more than one device, plain otherwise. `exchange`: one of `EXCHANGES`, or None to `choose_exchange`.
    `layer`: as in `routed_experts` (the weights then have a leading, never split, layer axis)."""
    from jax.sharding import PartitionSpec as P

    from qwen_jax.sharding import BATCH_AXES, spec_for

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return routed_experts(x, weights, experts, gate_up, down, layer=layer)
    batch = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
    lead = () if layer is None else (None,)
    gate_up_spec = spec_for(gate_up.shape, (*lead, *GATE_UP_AXES), mesh, "gate_up_proj")
    down_spec = spec_for(down.shape, (*lead, *DOWN_AXES), mesh, "down_proj")
    hidden = len(lead) + 1  # gate_up's hidden axis; down's is one further
    tokens = P(batch, None)

    def local(x, weights, experts, gate_up, down, layer):
        # Weights split over fsdp on the hidden dimension are gathered before use (FSDP).
        if gate_up_spec[hidden] is not None:
            gate_up = jax.lax.all_gather(gate_up, gate_up_spec[hidden], axis=hidden, tiled=True)
        if down_spec[hidden + 1] is not None:
            down = jax.lax.all_gather(down, down_spec[hidden + 1], axis=hidden + 1, tiled=True)
        n = mesh.shape["expert"]
        if n == 1:
            return routed_experts(x, weights, experts, gate_up, down, layer=layer)
        how = exchange or choose_exchange(x.shape[0], experts.shape[1], n)
        if how == "all_to_all":
            return all_to_all_experts(x, weights, experts, gate_up, down, "expert", layer)
        first = jax.lax.axis_index("expert") * gate_up.shape[-3]
        return jax.lax.psum(routed_experts(x, weights, experts, gate_up, down, first, layer), "expert")

    return jax.shard_map(
        local,
        in_specs=(tokens, tokens, tokens, gate_up_spec, down_spec, P()),
        out_specs=tokens,
        check_vma=False,
    )(x, weights, experts, gate_up, down, layer)


class SparseMoE(nn.Module):
    """x `[batch, seq, hidden]` -> same. `stacked`: the routed experts read from the stack of all repeats of this
    layer (`StackedExperts`, inference) instead of this module's own parameters."""

    config: TextConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, stacked: StackedExperts | None = None) -> jax.Array:
        c = self.config
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = Linear(c.num_experts, ("embed", "expert"), name="gate", dtype=self.dtype)(x)
        self.sow("intermediates", "router_logits", logits.astype(jnp.float32))  # [tokens, experts], for the aux loss
        weights, experts = route(logits, c.num_experts_per_tok, c.norm_topk_prob)
        if stacked is None:
            gate_up, down = ExpertWeights(c.num_experts, c.hidden_size, c.moe_intermediate_size, self.dtype,
                                          name="experts")()  # fmt: skip
            out = expert_parallel(x, weights, experts, gate_up, down)
        else:
            out = expert_parallel(x, weights, experts, stacked.gate_up_proj, stacked.down_proj, layer=stacked.layer)
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
