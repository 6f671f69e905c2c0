"""The Gated DeltaNet token mixer (the `linear_attn` layers of Qwen3-Next / Qwen3.5).

x -> in_proj_qkv -> causal depthwise conv + SiLU -> q, k, v; in_proj_z -> z (output gate); in_proj_b -> beta =
sigmoid(b); in_proj_a -> g = -exp(A_log) * softplus(a + dt_bias) (float32); the gated delta rule; gated RMSNorm
with silu(z); out_proj. The four input projections are one matmul (`in_proj`) in the stacked layout the model
computes with (`qwen_jax.layers.fused_projections`); the module takes either layout.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_jax.config import TextConfig
from qwen_jax.layers.delta_rule import chunked_gated_delta_rule, gated_delta_step, prepare_inputs
from qwen_jax.layers.fused_projections import FUSED_NAME, SPLIT_NAMES, split_outputs
from qwen_jax.layers.linear import INIT_STD, Linear
from qwen_jax.layers.norms import GatedRMSNorm


class DeltaNetState(NamedTuple):
    """What a delta-net layer carries across calls: the last `K-1` conv inputs `[batch, K-1, conv_dim]` (model
    dtype) and the recurrent state `[batch, value_heads, key_dim, value_dim]` (float32)."""

    conv: jax.Array
    recurrent: jax.Array


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time, no bias. x `[batch, seq, channels]`, kernel `[K, channels]`; `previous`
    `[batch, K-1, channels]` are the inputs before x (zeros at a sequence start); with `segment_ids [batch, seq]`
    (packed documents) an output reads only inputs of its own segment. Returns (out, last K-1 inputs)."""

    channels: int
    kernel_size: int
    dtype: Any

    @nn.compact
    def __call__(
        self, x: jax.Array, previous: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("conv_kernel", "conv_dim")),
            (self.kernel_size, self.channels),
            self.dtype,
        ).astype(self.dtype)
        k = self.kernel_size
        if previous is None:
            previous = jnp.zeros((x.shape[0], k - 1, x.shape[2]), x.dtype)
        padded = jnp.concatenate([previous.astype(x.dtype), x], axis=1)
        t = x.shape[1]
        taps = [padded[:, j : j + t] for j in range(k)]  # tap j reads the input k-1-j steps back
        if segment_ids is not None:
            before = jnp.repeat(segment_ids[:, :1], k - 1, axis=1)
            segments = jnp.concatenate([before, segment_ids], axis=1)
            taps = [jnp.where((segments[:, j : j + t] == segment_ids)[..., None], tap, 0) for j, tap in enumerate(taps)]
        out = sum(tap * kernel[j] for j, tap in enumerate(taps))
        return out, padded[:, t:]


class GatedDeltaNet(nn.Module):
    """x `[batch, seq, hidden]`; mask `[batch, seq]` (0 = padding, which never touches the conv or delta state);
    segment_ids `[batch, seq]`: packed documents, which neither the conv nor the delta state crosses."""

    config: TextConfig
    dtype: Any

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        state: DeltaNetState | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, DeltaNetState]:
        c = self.config
        b, t, _ = x.shape
        hk, hv = c.linear_num_key_heads, c.linear_num_value_heads
        dk, dv = c.linear_key_head_dim, c.linear_value_head_dim
        if mask is not None:
            x = x * mask[..., None].astype(x.dtype)

        def proj(features, name):
            return Linear(features, ("embed", "gdn_proj"), name=name, dtype=self.dtype)(x)

        if self.has_variable("params", FUSED_NAME):  # the layout the model computes with (`fused_projections`)
            fused_width = c.conv_dim + c.value_dim + 2 * hv
            mixed, z, beta_logit, a = split_outputs(proj(fused_width, FUSED_NAME), c)
        else:  # the storage layout (also what `init` creates)
            mixed, z, beta_logit, a = (proj(n, name) for n, name in zip((c.conv_dim, c.value_dim, hv, hv), SPLIT_NAMES))
        z = z.reshape(b, t, hv, dv)

        conv = CausalConv1d(c.conv_dim, c.linear_conv_kernel_dim, self.dtype, name="conv1d")
        mixed, conv_state = conv(mixed, None if state is None else state.conv, segment_ids)
        mixed = jax.nn.silu(mixed)
        q = mixed[..., : hk * dk].reshape(b, t, hk, dk)
        k = mixed[..., hk * dk : 2 * hk * dk].reshape(b, t, hk, dk)
        v = mixed[..., 2 * hk * dk :].reshape(b, t, hv, dv)

        head_param = lambda name, init: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(init, ("gdn_heads",)), (hv,), jnp.float32
        )
        a_log = head_param("A_log", lambda key, shape, dtype: jnp.log(jax.random.uniform(key, shape, dtype, 0.01, 16)))
        dt_bias = head_param("dt_bias", nn.initializers.ones_init())
        beta = jax.nn.sigmoid(beta_logit)
        g = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(a.astype(jnp.float32) + dt_bias.astype(jnp.float32))

        initial = None if state is None else state.recurrent
        if t == 1 and initial is not None:
            pq, pk, pv, pg, pbeta = prepare_inputs(q, k, v, g, beta, mask, normalize_qk=True)
            o, recurrent = gated_delta_step(pq[:, 0], pk[:, 0], pv[:, 0], pg[:, 0], pbeta[:, 0], initial)
            o = o[:, None].astype(v.dtype)
        else:
            o, recurrent = chunked_gated_delta_rule(
                q, k, v, g, beta, chunk_size=c.chunk_size, initial_state=initial, mask=mask,
                segment_ids=segment_ids, unroll=c.unroll_loops,
            )  # fmt: skip
        o = GatedRMSNorm(dv, c.rms_norm_eps, name="norm")(o, z)
        out = Linear(c.hidden_size, ("gdn_proj", "embed"), name="out_proj", dtype=self.dtype)(o.reshape(b, t, -1))
        return out, DeltaNetState(conv_state, recurrent)
