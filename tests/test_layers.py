"""Each layer against the reference's own module instance, with the weights carried over by the converter.

The layer test takes the reference module out of a tiny built model (`reference.model.layers[i].<module>`) and our
module's parameters from the converted checkpoint of the same model, and feeds both the same random hidden states.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import text_positions

from qwen_jax.layers.attention import Attention, attention_bias
from qwen_jax.layers.gated_deltanet import GatedDeltaNet
from qwen_jax.layers.moe import SparseMoE
from qwen_jax.layers.norms import GatedRMSNorm, RMSNorm
from qwen_jax.layers.rope import rotary_tables
from qwen_jax.stacking import layer_params as stacked_layer

# float32 on both sides; layer outputs are O(1) and differ by ~1e-7, so 1e-5 absolute leaves only rounding.
ATOL = 1e-5
FAMILIES = ["qwen3_5_moe_per_expert", "qwen3_next"]


def hidden(seed: int, batch: int = 2, seq: int = 150, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, seq, width)).astype(np.float32)


def torch_out(module, *args, **kwargs):
    with torch.no_grad():
        out = module(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return out.numpy()


def layer_params(built, index: int, name: str):
    return stacked_layer(built.model.params, built.model.config.text, index)[name]


def text_config(built):
    return built.model.config.text


def pad_mask(batch: int, seq: int, pad: int) -> np.ndarray:
    mask = np.ones((batch, seq), np.int64)
    mask[-1, :pad] = 0
    return mask


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_gated_deltanet_layer(built_models, name, padded):
    built = built_models(name)
    x = hidden(seed=1)
    mask = pad_mask(2, 150, 23) if padded else None
    ref = torch_out(built.reference.model.layers[0].linear_attn, torch.from_numpy(x),
                    attention_mask=None if mask is None else torch.from_numpy(mask))  # fmt: skip
    module = GatedDeltaNet(text_config(built), jnp.float32)
    ours, _ = module.apply({"params": layer_params(built, 0, "linear_attn")}, x, mask)
    valid = np.ones((2, 150), bool) if mask is None else mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], ref[valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("seq", [150, 333])  # queries in 2 and 3 blocks on CPU (`CPU_QUERY_BLOCK`), the last partial
def test_attention_layer(built_models, name, seq):
    built = built_models(name)
    x = hidden(seed=2, seq=seq)
    mask = pad_mask(2, seq, 31)
    positions = text_positions(mask)
    rotary = built.reference.model.rotary_emb
    cos, sin = rotary(torch.from_numpy(x), torch.from_numpy(positions))
    slots = np.broadcast_to(np.arange(seq), (2, seq))
    bias = np.asarray(attention_bias(jnp.asarray(slots), jnp.asarray(slots), jnp.asarray(mask)))
    ref = torch_out(built.reference.model.layers[3].self_attn, torch.from_numpy(x), position_embeddings=(cos, sin),
                    attention_mask=torch.from_numpy(bias.copy()))  # fmt: skip
    config = text_config(built)
    our_cos, our_sin = rotary_tables(jnp.asarray(positions), config.rope, config.head_dim, jnp.float32)
    ours, _ = Attention(config, jnp.float32).apply(
        {"params": layer_params(built, 3, "self_attn")}, x, our_cos, our_sin, jnp.asarray(bias)
    )
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], ref[valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_sparse_moe_block(built_models, name):
    built = built_models(name)
    x = hidden(seed=3, seq=40)
    ref = torch_out(built.reference.model.layers[0].mlp, torch.from_numpy(x))
    ours = SparseMoE(text_config(built), jnp.float32).apply({"params": layer_params(built, 0, "mlp")}, x)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=0)


def test_norms(built_models):
    built = built_models("qwen3_5_moe_per_expert")
    layer = built.reference.model.layers[0]
    x = hidden(seed=4, seq=10)
    ref = torch_out(layer.input_layernorm, torch.from_numpy(x))
    ours = RMSNorm(64).apply({"params": layer_params(built, 0, "input_layernorm")}, x)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=0)

    heads = np.random.default_rng(5).standard_normal((2, 10, 4, 8)).astype(np.float32)
    gate = np.random.default_rng(6).standard_normal((2, 10, 4, 8)).astype(np.float32)
    ref = torch_out(
        layer.linear_attn.norm, torch.from_numpy(heads.reshape(-1, 8)), torch.from_numpy(gate.reshape(-1, 8))
    )
    ours = GatedRMSNorm(8).apply({"params": layer_params(built, 0, "linear_attn")["norm"]}, heads, gate)
    np.testing.assert_allclose(np.asarray(ours).reshape(-1, 8), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["qwen3_5_moe_per_expert", "qwen3_5_moe_yarn", "qwen3_next"])
def test_rotary_tables(built_models, name):
    """cos/sin against the reference rotary embedding, with distinct temporal/height/width rows for MRoPE."""
    built = built_models(name)
    config = text_config(built)
    rng = np.random.default_rng(7)
    mrope = config.rope.mrope_section is not None
    positions = rng.integers(0, 4000, size=(3, 2, 50) if mrope else (2, 50))
    x = torch.zeros(1, dtype=torch.float32)
    ref_cos, ref_sin = (t.numpy() for t in built.reference.model.rotary_emb(x, torch.from_numpy(positions)))
    cos, sin = rotary_tables(jnp.asarray(positions), config.rope, config.head_dim, jnp.float32)
    # Both sides form the same float32 angles; only the cos/sin implementations differ (~1e-7).
    np.testing.assert_allclose(np.asarray(cos), ref_cos, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(sin), ref_sin, atol=1e-5, rtol=0)


@pytest.mark.parametrize("section", [None, [3, 3, 2], [1, 2, 1]])
def test_mrope_sections_that_do_not_fill_the_slots(section):
    """The reference applies the interleave rule whatever the section's sum (default [11, 11, 10] with a small head);
    so do we."""
    import transformers
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    from qwen_jax.config import parse_config

    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}
    if section is not None:
        rope["mrope_section"] = section
    raw = dict(model_type="qwen3_5_text", head_dim=32, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               rope_parameters=rope)  # fmt: skip
    reference = Qwen3_5TextRotaryEmbedding(
        transformers.Qwen3_5TextConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    )
    positions = np.random.default_rng(0).integers(0, 500, size=(3, 1, 20))
    ref_cos, ref_sin = (t.numpy() for t in reference(torch.zeros(1), torch.from_numpy(positions)))
    config = parse_config(raw).text
    cos, sin = rotary_tables(jnp.asarray(positions), config.rope, config.head_dim, jnp.float32)
    np.testing.assert_allclose(np.asarray(cos), ref_cos, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(sin), ref_sin, atol=1e-5, rtol=0)


def test_init_params_follow_the_reference_initialization(built_models):
    """Random parameters have the converted checkpoint's tree and shapes, and the reference's init conventions:
    zero-centred norms start at 0, the gated norm at 1, dt_bias at 1, A_log = log U(0.01, 16)."""
    import jax

    from qwen_jax.model import init_params

    model = built_models("qwen3_5_moe_per_expert").model
    params = init_params(model.config.text, jax.random.key(0))
    shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)  # noqa: E731
    assert shapes(params) == shapes(model.params)
    first = stacked_layer(params, model.config.text, 0)
    delta = first["linear_attn"]
    assert not np.asarray(first["input_layernorm"]["weight"]).any()
    assert (np.asarray(delta["norm"]["weight"]) == 1).all() and (np.asarray(delta["dt_bias"]) == 1).all()
    a = np.exp(np.asarray(delta["A_log"]))
    assert ((a >= 0.01) & (a <= 16)).all()
