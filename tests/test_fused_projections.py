"""The delta-net input projections fused at load time: exact inverses, per-key-head grouping, and the same layer
output as the four separate projections (the storage layout, checked against the reference in test_layers)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import TextConfig
from qwen_jax.layers.fused_projections import fuse_kernels, fuse_layer, split_kernels, split_layer
from qwen_jax.layers.gated_deltanet import GatedDeltaNet


def config(**overrides) -> TextConfig:
    from qwen_jax.config import parse_config

    raw = dict(model_type="qwen3_5_text", vocab_size=64, hidden_size=48, num_hidden_layers=4, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=6,
               linear_key_head_dim=8, linear_value_head_dim=4, intermediate_size=32)  # fmt: skip
    return dataclasses.replace(parse_config(dict(raw, **overrides)).text)


def test_fuse_and_split_are_exact_inverses_grouped_per_key_head():
    c = config()
    rng = np.random.default_rng(0)
    hk, dk, dv, g = 2, 8, 4, 3
    qkv, z, b, a = (rng.standard_normal((5, 48, n)) for n in (c.conv_dim, 6 * dv, 6, 6))
    fused = fuse_kernels(qkv, z, b, a, c)
    width = 2 * dk + g * (2 * dv + 2)
    assert fused.shape == (5, 48, hk * width)
    head = fused[..., width : 2 * width]  # key head 1: q_1, k_1, v / z / b / a of value heads 3..5
    np.testing.assert_array_equal(head[..., :dk], qkv[..., dk : 2 * dk])
    np.testing.assert_array_equal(head[..., dk : 2 * dk], qkv[..., 3 * dk : 4 * dk])
    np.testing.assert_array_equal(head[..., 2 * dk : 2 * dk + g * dv], qkv[..., 4 * dk + g * dv :])
    np.testing.assert_array_equal(head[..., 2 * dk + g * dv : 2 * dk + 2 * g * dv], z[..., g * dv :])
    np.testing.assert_array_equal(head[..., -2 * g : -g], b[..., g:])
    np.testing.assert_array_equal(head[..., -g:], a[..., g:])
    for ours, original in zip(split_kernels(fused, c), (qkv, z, b, a)):
        np.testing.assert_array_equal(ours, original)


def test_fused_layer_computes_what_the_four_projections_compute():
    c = config()
    x = jax.random.normal(jax.random.key(1), (2, 70, 48))
    mask = jnp.ones((2, 70)).at[1, :9].set(0)
    module = GatedDeltaNet(c, jnp.float32)
    split = nn.meta.unbox(module.init(jax.random.key(2), x, mask)["params"])
    fused = fuse_layer({"linear_attn": split}, c)["linear_attn"]
    assert "in_proj" in fused and "in_proj_qkv" not in fused
    jax.tree.map(np.testing.assert_array_equal, split_layer({"linear_attn": fused}, c)["linear_attn"], split)
    (expected, expected_state), (out, state) = (module.apply({"params": p}, x, mask) for p in (split, fused))
    # One matmul instead of four: the same products, summed in a possibly different order (float32 rounding).
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * float(jnp.abs(expected).max()))
    np.testing.assert_allclose(state.recurrent, expected_state.recurrent, rtol=0, atol=1e-5)


def test_fused_gate_up_and_whole_model_layout():
    """Gate and up interleaved per unit; every layer of a MoE model (shared expert, routed experts untouched) round
    trips, and the logits of the fused layout equal those of the storage layout."""
    from qwen_jax.model import forward, init_params
    from qwen_jax.stacking import stack_layers, unstack_layers

    c = config(model_type="qwen3_5_moe_text", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
               shared_expert_intermediate_size=12)  # fmt: skip
    params = init_params(c, jax.random.key(0))
    layer = params["layers"][0][0]
    assert "gate_up_proj" in layer["mlp"]["shared_expert"] and "in_proj" in layer["linear_attn"]
    storage = unstack_layers(params, c)
    shared = storage["layers_0"]["mlp"]["shared_expert"]
    fused = np.asarray(layer["mlp"]["shared_expert"]["gate_up_proj"]["kernel"][0])
    np.testing.assert_array_equal(fused[:, 0::2], shared["gate_proj"]["kernel"])
    np.testing.assert_array_equal(fused[:, 1::2], shared["up_proj"]["kernel"])
    experts = storage["layers_0"]["mlp"]["experts"]["gate_up_proj"]
    np.testing.assert_array_equal(experts, layer["mlp"]["experts"]["gate_up_proj"][0])
    jax.tree.map(np.testing.assert_array_equal, stack_layers(storage, c), params)
    ids = jax.random.randint(jax.random.key(3), (2, 40), 0, 64)
    # The storage layout, stacked without fusing: what the layers compute with separate projections.
    unfused = dict(params, layers=tuple(tuple(split_layer(p, c) for p in s) for s in params["layers"]))
    np.testing.assert_allclose(forward(unfused, c, ids), forward(params, c, ids), rtol=0, atol=1e-5)
