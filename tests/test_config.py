"""`qwen_jax.config.parse_config` against the reference (`transformers` 5.23.0): the reference config built from the
same dict, and the reference model built from it on the meta device (no memory), whose modules say what the
config really means (which layers are linear attention or MoE, head counts, a tied head, every parameter shape).
RoPE: our inverse frequencies and cos/sin scale against the reference rotary embedding, default and YaRN."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeTextRotaryEmbedding
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRotaryEmbedding

from qwen_jax.checkpoint.hf_mapping import plan
from qwen_jax.config import FULL_ATTENTION, LINEAR_ATTENTION, ConfigError, parse_config
from qwen_jax.layers.rope import inverse_frequencies

transformers.logging.set_verbosity_error()  # the reference warns about YaRN factors that disagree with max positions

# model_type -> (reference config class, reference model class, rotary embedding class of the text model)
REFERENCE = {
    "qwen3_next": (transformers.Qwen3NextConfig, transformers.Qwen3NextForCausalLM, Qwen3NextRotaryEmbedding),
    "qwen3_5_text": (transformers.Qwen3_5TextConfig, transformers.Qwen3_5ForCausalLM, Qwen3_5TextRotaryEmbedding),
    "qwen3_5_moe_text": (transformers.Qwen3_5MoeTextConfig, transformers.Qwen3_5MoeForCausalLM,
                         Qwen3_5MoeTextRotaryEmbedding),
    "qwen3_5": (transformers.Qwen3_5Config, transformers.Qwen3_5ForConditionalGeneration,
                Qwen3_5TextRotaryEmbedding),
    "qwen3_5_moe": (transformers.Qwen3_5MoeConfig, transformers.Qwen3_5MoeForConditionalGeneration,
                    Qwen3_5MoeTextRotaryEmbedding),
}  # fmt: skip
COMPOSITE = ("qwen3_5", "qwen3_5_moe")

SMALL = dict(vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
             linear_value_head_dim=8, linear_conv_kernel_dim=3, max_position_embeddings=4096)  # fmt: skip
SMALL_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)
# head_dim 32 * 0.25 = 8 rotary features: 4 frequency slots, split 2 | 1 | 1 over (t, h, w).
SMALL_MROPE = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
               "mrope_interleaved": True}  # fmt: skip
SMALL_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, temporal_patch_size=2,
                    spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=16)  # fmt: skip

CASES = {
    # The class defaults alone (head_dim 256 * 0.25 = 64 rotary features: the reference's default MRoPE section
    # [11, 11, 10] fits).
    "qwen3_5_moe_text-defaults": {"model_type": "qwen3_5_moe_text"},
    "qwen3_next-defaults": {"model_type": "qwen3_next"},
    "qwen3_5_text-defaults": {"model_type": "qwen3_5_text"},
    "qwen3_5-defaults": {"model_type": "qwen3_5"},
    # Full attention every 2nd layer, a tied head, biases, non-default eps, rotary half of a head.
    "qwen3_5_text-interval2": {
        "model_type": "qwen3_5_text", **SMALL, "num_hidden_layers": 6, "full_attention_interval": 2,
        "intermediate_size": 48, "tie_word_embeddings": True, "attention_bias": True, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5,
                            "mrope_section": [4, 2, 2]},
    },
    # Old-style top-level rope fields, every 3rd layer full attention, sparse step 2 with a dense layer, and the
    # Qwen3-Next-only router without renormalization.
    "qwen3_next-legacy-rope": {
        "model_type": "qwen3_next", **SMALL, **SMALL_MOE, "num_hidden_layers": 7, "full_attention_interval": 3,
        "rope_theta": 5e6, "partial_rotary_factor": 0.5, "decoder_sparse_step": 2, "mlp_only_layers": [3],
        "intermediate_size": 40, "norm_topk_prob": False,
    },
    # A small head with no mrope_section: the reference's [11, 11, 10] (more slots than the 4 there are).
    "qwen3_5_text-small-default-mrope": {
        "model_type": "qwen3_5_text", **SMALL, "intermediate_size": 48,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25},
    },
    # Explicit layer_types.
    "qwen3_5_moe_text-layer_types": {
        "model_type": "qwen3_5_moe_text", **SMALL, **SMALL_MOE, "rope_parameters": SMALL_MROPE,
        "layer_types": [FULL_ATTENTION, LINEAR_ATTENTION, FULL_ATTENTION, LINEAR_ATTENTION],
    },
    # The legacy layer type names the reference renames on load ("mamba", "attention").
    "qwen3_next-legacy-layer-names": {
        "model_type": "qwen3_next", **SMALL, **SMALL_MOE, "intermediate_size": 40,
        "layer_types": ["mamba", "attention", "mamba", "full_attention"],
    },
    # Composite: the top-level tie_word_embeddings (not the text config's) decides.
    "qwen3_5_moe-composite": {
        "model_type": "qwen3_5_moe", "tie_word_embeddings": True, "image_token_id": 290, "video_token_id": 291,
        "text_config": dict(SMALL, **SMALL_MOE, rope_parameters=SMALL_MROPE, tie_word_embeddings=False),
        "vision_config": SMALL_VISION,
    },
}  # fmt: skip


def build_reference(raw: dict):
    """(text config, whole config, model on the meta device, its text decoder) for a config dict."""
    raw = copy.deepcopy(raw)  # the reference standardizes rope_parameters in place
    config_cls, model_cls, _ = REFERENCE[raw.pop("model_type")]
    config = config_cls(**raw)
    with torch.device("meta"):
        model = model_cls(config)
    if isinstance(config, (transformers.Qwen3_5Config, transformers.Qwen3_5MoeConfig)):
        return config.text_config, config, model, model.model.language_model
    return config, config, model, model.model


def parse(raw: dict):
    return parse_config(copy.deepcopy(raw))


@pytest.mark.parametrize("name", list(CASES))
def test_fields_match_reference(name):
    raw = CASES[name]
    ours_all = parse(raw)
    ours = ours_all.text
    ref, ref_all, model, decoder = build_reference(raw)

    # Plain fields, as the reference config holds them (after its own defaults).
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "attention_bias", "rms_norm_eps", "max_position_embeddings", "linear_num_key_heads",
                  "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                  "linear_conv_kernel_dim"):  # fmt: skip
        assert getattr(ours, field) == getattr(ref, field), field
    assert list(ours.layer_types) == list(ref.layer_types)

    # What the reference model built from it.
    layers = list(decoder.layers)
    assert len(layers) == ours.num_hidden_layers
    for i, layer in enumerate(layers):
        assert hasattr(layer, "linear_attn") == (ours.layer_types[i] == LINEAR_ATTENTION), i
        assert hasattr(layer, "self_attn") == (ours.layer_types[i] == FULL_ATTENTION), i
        if hasattr(layer, "self_attn"):
            assert layer.self_attn.head_dim == ours.head_dim
            assert layer.self_attn.num_key_value_groups == ours.num_attention_heads // ours.num_key_value_heads
        else:
            la = layer.linear_attn
            assert (la.num_k_heads, la.num_v_heads, la.head_k_dim, la.head_v_dim, la.conv_kernel_size) == (
                ours.linear_num_key_heads, ours.linear_num_value_heads, ours.linear_key_head_dim,
                ours.linear_value_head_dim, ours.linear_conv_kernel_dim)  # fmt: skip
    moe = tuple(type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in layers)
    assert ours.moe_layers == moe
    if any(moe):
        gate = next(layer.mlp.gate for layer in layers if type(layer.mlp).__name__.endswith("SparseMoeBlock"))
        assert (ours.num_experts, ours.num_experts_per_tok) == (gate.num_experts, gate.top_k)
        assert ours.moe_intermediate_size == ref.moe_intermediate_size
        assert ours.shared_expert_intermediate_size == ref.shared_expert_intermediate_size
        if hasattr(gate, "norm_topk_prob"):  # Qwen3-Next
            assert ours.norm_topk_prob == gate.norm_topk_prob
        else:  # the Qwen3.5-MoE router renormalizes the top-k probabilities unconditionally
            assert ours.norm_topk_prob is True
    else:
        assert ours.num_experts == 0
    if not all(moe):
        assert ours.intermediate_size == ref.intermediate_size
    assert ours.tie_word_embeddings == (model.lm_head.weight is decoder.embed_tokens.weight)

    # RoPE: the reference's standardized parameters, and the MRoPE section its rotary embedding uses.
    assert ours.rope.theta == ref.rope_parameters["rope_theta"]
    assert ours.rope.partial_rotary_factor == ref.rope_parameters["partial_rotary_factor"]
    assert ours.rope.rope_type == ref.rope_parameters["rope_type"] == "default"
    rotary = REFERENCE[raw["model_type"]][2](ref)
    if raw["model_type"] == "qwen3_next":
        assert ours.rope.mrope_section is None and not hasattr(rotary, "mrope_section")
    else:
        assert list(ours.rope.mrope_section) == list(rotary.mrope_section)

    # Every parameter shape the parsed config implies is the reference model's (keys and shapes, both ways).
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapping = plan(ours_all, shapes)
    for rule in mapping.rules:
        for key, shape in zip(rule.sources, rule.source_shapes):
            assert shapes[key] == shape, key
    assert not mapping.set_aside and not mapping.mtp_keys

    if raw["model_type"] in COMPOSITE:
        vision, ref_vision = ours_all.vision, ref_all.vision_config
        fields = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                  "temporal_patch_size", "spatial_merge_size", "out_hidden_size",
                  "num_position_embeddings")  # fmt: skip
        for field in fields:
            assert getattr(vision, field) == getattr(ref_vision, field), field
        for field in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            assert getattr(ours_all, field) == getattr(ref_all, field), field
        assert ours_all.text_prefix == "model.language_model."
    else:
        assert ours_all.vision is None and ours_all.text_prefix == "model."


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"])
@pytest.mark.parametrize("layers, interval", [(6, 2), (7, 3), (5, 1), (3, 4)])
def test_full_attention_interval(model_type, layers, interval):
    raw = {"model_type": model_type, "num_hidden_layers": layers, "full_attention_interval": interval}
    ref = REFERENCE[model_type][0](**{k: v for k, v in raw.items() if k != "model_type"})
    assert list(parse(raw).text.layer_types) == list(ref.layer_types)


@pytest.mark.parametrize(
    "mlp_only_layers, step, num_experts",
    [([1, 4], 2, 4), ([], 3, 4), (None, 1, 4), ([0, 2], 1, 4), (list(range(6)), 1, 4), ([], 1, 0)],
)
def test_qwen3_next_moe_layers(mlp_only_layers, step, num_experts):
    raw = {"model_type": "qwen3_next", **SMALL, "num_hidden_layers": 6, "intermediate_size": 40,
           "num_experts": num_experts, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
           "shared_expert_intermediate_size": 16, "decoder_sparse_step": step,
           "mlp_only_layers": mlp_only_layers}  # fmt: skip
    ref, _, _, decoder = build_reference(raw)
    reference = tuple(type(layer.mlp).__name__ == "Qwen3NextSparseMoeBlock" for layer in decoder.layers)
    rule = tuple(i not in ref.mlp_only_layers and ref.num_experts > 0 and (i + 1) % ref.decoder_sparse_step == 0
                 for i in range(6))  # fmt: skip
    assert reference == rule  # the reference's own rule, as its decoder applies it
    assert parse(raw).text.moe_layers == reference


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25},
    "default-half": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.5},
    "yarn": dict(YARN),
    "yarn-no-original": {"rope_type": "yarn", "factor": 2.0},  # the reference takes max_position_embeddings
    "yarn-betas-untruncated": dict(YARN, factor=8.0, beta_fast=16, beta_slow=2, truncate=False, rope_theta=5e6),
    "yarn-mscale": dict(YARN, mscale=0.7, mscale_all_dim=1.0),
    "yarn-attention_factor": dict(YARN, attention_factor=0.9),
    "yarn-old-type-key": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
}


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"])
@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("rope", list(ROPES))
def test_rope_matches_reference_rotary_embedding(model_type, head_dim, rope):
    params = dict(ROPES[rope])
    rotary_half = int(head_dim * params.get("partial_rotary_factor", 0.25)) // 2
    if model_type != "qwen3_next" and rotary_half != 32:  # else the default [11, 11, 10] applies (and fits)
        params["mrope_section"] = [rotary_half - 2 * (rotary_half // 3), rotary_half // 3, rotary_half // 3]
    raw = {"model_type": model_type, "head_dim": head_dim, "max_position_embeddings": 8192, "rope_parameters": params}
    config_cls, _, rotary_cls = REFERENCE[model_type]
    ref_config = config_cls(**copy.deepcopy({k: v for k, v in raw.items() if k != "model_type"}))
    rotary = rotary_cls(ref_config)
    ours = parse(raw).text
    expected_type = params.get("rope_type", params.get("type"))
    assert ours.rope.rope_type == ref_config.rope_parameters["rope_type"] == expected_type
    inv_freq, scaling = inverse_frequencies(ours.rope, ours.head_dim)
    reference = rotary.inv_freq.numpy()
    assert inv_freq.dtype == np.float32 and inv_freq.shape == reference.shape == (rotary_half,)
    # Both are float32 computations of the same formula; torch's float32 pow is itself only ~0.5 ulp accurate, so
    # a result a hair from a rounding tie may land one ulp apart (at most 1.2e-7 relative).
    np.testing.assert_array_max_ulp(inv_freq, reference, maxulp=1)
    # The same double-precision formula on both sides.
    assert scaling == pytest.approx(rotary.attention_scaling, rel=1e-12, abs=0)
    if expected_type == "yarn":
        assert scaling != 1.0 and not np.allclose(inv_freq, inverse_frequencies(ours.rope.__class__(
            theta=ours.rope.theta, partial_rotary_factor=ours.rope.partial_rotary_factor), head_dim)[0])  # fmt: skip
        if "original_max_position_embeddings" not in params:
            assert ours.rope.original_max_position_embeddings == 8192
    if model_type != "qwen3_next":
        assert list(ours.rope.mrope_section) == list(rotary.mrope_section)


# --- errors -----------------------------------------------------------------------------------------------------


def test_unknown_model_type_lists_supported_types():
    with pytest.raises(ConfigError) as info:
        parse_config({"model_type": "llama"})
    message = str(info.value)
    assert "'llama'" in message
    for config_cls, _, _ in REFERENCE.values():  # every model type this library reads, as the reference names it
        assert config_cls.model_type in message, config_cls.model_type
    with pytest.raises(ConfigError, match="unsupported model_type None"):
        parse_config({"hidden_size": 64})


def test_yarn_without_factor():
    raw = {"model_type": "qwen3_5_moe_text", "rope_parameters": {"rope_type": "yarn",
                                                                 "original_max_position_embeddings": 128}}  # fmt: skip
    with pytest.raises(KeyError, match="factor"):  # the reference refuses it too
        transformers.Qwen3_5MoeTextConfig(rope_parameters=copy.deepcopy(raw["rope_parameters"]))
    with pytest.raises(ConfigError, match=r"yarn.*factor"):
        parse(raw)


def test_heads_not_a_multiple_of_kv_heads():
    raw = {"model_type": "qwen3_5_text", **SMALL, "num_attention_heads": 6, "num_key_value_heads": 4,
           "intermediate_size": 48, "num_hidden_layers": 1, "layer_types": [FULL_ATTENTION],
           "rope_parameters": SMALL_MROPE}  # fmt: skip
    # The reference config takes it, but its model cannot run it (GQA repeats whole groups of heads).
    ref, _, _, _ = build_reference(raw)
    model = transformers.Qwen3_5ForCausalLM(ref)
    with pytest.raises(RuntimeError):
        model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match="num_attention_heads 6 is not a multiple of num_key_value_heads 4"):
        parse(raw)


@pytest.mark.parametrize("bad", ["bogus", "sliding_attention"])
def test_unknown_layer_type(bad):
    raw = {"model_type": "qwen3_next", **SMALL, **SMALL_MOE, "num_hidden_layers": 2, "intermediate_size": 40,
           "layer_types": [LINEAR_ATTENTION, bad]}  # fmt: skip
    if bad == "bogus":  # the reference's validator rejects it
        with pytest.raises(Exception, match="layer_types"):
            build_reference(raw)
    else:  # the reference accepts it but builds a decoder layer with no token mixer at all
        _, _, _, decoder = build_reference(raw)
        assert not hasattr(decoder.layers[1], "self_attn") and not hasattr(decoder.layers[1], "linear_attn")
    with pytest.raises(ConfigError, match=f"unknown layer type.*{bad}"):
        parse(raw)
