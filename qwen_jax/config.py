"""Model configuration: frozen, hashable dataclasses parsed from a checkpoint's `config.json`.

The parsing follows the reference (`transformers` 5.23.0) exactly: every field the reference defaults is defaulted to
the same value, per model type, and everything it would reject (or silently misread) is a `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from qwen_jax.errors import InputError

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"
# Legacy layer type names the reference renames on load (`_LEGACY_LAYER_TYPE_REMAP` in `configuration_utils`).
_LEGACY_LAYER_TYPES = {"mamba": LINEAR_ATTENTION, "attention": FULL_ATTENTION}


class ConfigError(InputError):
    """A `config.json` that this library cannot turn into a model."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of the full-attention layers.

    `mrope_section` is None for plain partial RoPE (Qwen3-Next); otherwise the frequency slots are assigned to the
    (temporal, height, width) position rows in the interleaved layout of Qwen3.5 / Qwen3-VL.
    """

    theta: float
    partial_rotary_factor: float
    mrope_section: tuple[int, ...] | None = None
    rope_type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The hybrid (Gated DeltaNet + gated attention) decoder of Qwen3-Next and Qwen3.5."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    # Full attention.
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attention_bias: bool
    rope: RopeConfig
    # Gated DeltaNet.
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    # Feed-forward: `moe_layers[i]` says whether layer i is a sparse MoE block (else a dense SwiGLU MLP).
    moe_layers: tuple[bool, ...]
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    # Qwen3-Next / Qwen3.5: zero-centred norms `(1 + w)` and a sigmoid output gate in attention. Qwen3-VL: neither.
    zero_centered_norm: bool = True
    attention_output_gate: bool = True
    # The delta rule's chunk length for prefill / training (not a checkpoint field); None: the backend's
    # (`qwen_jax.layers.delta_rule.default_chunk_size`).
    chunk_size: int | None = None
    # Compile analysis only (`qwen_jax.plan`): unroll the layer and chunk scans, whose bodies XLA's cost analysis
    # would otherwise count once.
    unroll_loops: bool = False
    # Run the decoder as one `lax.scan` per segment of repeats (`qwen_jax.stacking`; compile time of one repeat) or,
    # when False, each repeat as its own segment of one: then every layer's weights are arrays of their own, which
    # XLA:CPU reads in place, where a scan would copy each layer's slice out of the stack at every step (batch-1
    # decode of the issue-6 model: see `default_scan_layers`). Not a checkpoint field.
    scan_layers: bool = True

    @property
    def conv_dim(self) -> int:
        """Channels of the depthwise conv: q | k | v."""
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + self.value_dim

    @property
    def value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    def replace(self, **changes: Any) -> TextConfig:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The ViT of Qwen3-VL and Qwen3.5: 3D patches, learned + 2D rotary positions, a 2x2 merger, and (Qwen3-VL)
    DeepStack mergers after the blocks in `deepstack_visual_indexes`."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Features of one flattened patch: channels x temporal x height x width."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A whole checkpoint: its top-level `model_type`, the text decoder and, for vision-language checkpoints, the
    vision tower and the special token ids that place its features."""

    model_type: str
    text: TextConfig
    # Where the text decoder's weights live in the Hugging Face checkpoint ("model." or "model.language_model.").
    text_prefix: str
    vision: VisionConfig | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# Class defaults of the reference configs (`Qwen3NextConfig`, `Qwen3_5TextConfig`, `Qwen3_5MoeTextConfig`).
_COMMON_DEFAULTS: dict[str, Any] = dict(
    num_attention_heads=16,
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    attention_bias=False,
    head_dim=256,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
)
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_next": dict(
        _COMMON_DEFAULTS,
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=48,
        num_key_value_heads=2,
        decoder_sparse_step=1,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        num_experts_per_tok=10,
        num_experts=512,
        norm_topk_prob=True,
        mlp_only_layers=None,
    ),
    "qwen3_5_text": dict(
        _COMMON_DEFAULTS,
        vocab_size=248320,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=32,
        num_key_value_heads=4,
    ),
    "qwen3_5_moe_text": dict(
        _COMMON_DEFAULTS,
        vocab_size=248320,
        hidden_size=2048,
        num_hidden_layers=40,
        num_key_value_heads=2,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        num_experts_per_tok=8,
        num_experts=256,
    ),
}
_VL_TEXT_COMMON: dict[str, Any] = dict(
    hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6, attention_bias=False, head_dim=None
)
_TEXT_DEFAULTS["qwen3_vl_text"] = dict(
    _VL_TEXT_COMMON, vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=None, tie_word_embeddings=False,
)  # fmt: skip
_TEXT_DEFAULTS["qwen3_vl_moe_text"] = dict(
    _VL_TEXT_COMMON, vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
    num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True, decoder_sparse_step=1,
    moe_intermediate_size=1408, num_experts_per_tok=4, num_experts=60, mlp_only_layers=None,
)  # fmt: skip
_VL_TEXT = ("qwen3_vl_text", "qwen3_vl_moe_text")
_VISION_DEFAULTS: dict[str, Any] = dict(
    depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh", intermediate_size=4304, num_heads=16, in_channels=3,
    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584, num_position_embeddings=2304,
)  # fmt: skip
# Composite (vision-language) model types: their text model type, whether the ViT has DeepStack mergers, and the
# default special token ids (image, video, vision start, vision end).
_COMPOSITE = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text", "qwen3_vl": "qwen3_vl_text",
              "qwen3_vl_moe": "qwen3_vl_moe_text"}  # fmt: skip
_DEEPSTACK = {"qwen3_5": False, "qwen3_5_moe": False, "qwen3_vl": True, "qwen3_vl_moe": True}
_TOKEN_IDS = {
    "qwen3_5": (248056, 248057, 248053, 248054),
    "qwen3_5_moe": (248056, 248057, 248053, 248054),
    "qwen3_vl": (151655, 151656, 151652, 151653),
    "qwen3_vl_moe": (151655, 151656, 151652, 151653),
}
SUPPORTED_MODEL_TYPES = tuple(sorted((set(_TEXT_DEFAULTS) - set(_VL_TEXT)) | set(_COMPOSITE)))


def _int(d: dict[str, Any], key: str, minimum: int = 1) -> int:
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config field {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _parse_rope(
    d: dict[str, Any],
    head_dim: int,
    max_position_embeddings: int,
    default_section: tuple[int, ...] | None,
    default_theta: float = 10000.0,
    default_partial: float = 0.25,
) -> RopeConfig:
    """Mirror of `RotaryEmbeddingConfigMixin.convert_rope_params_to_dict` + `standardize_rope_params`.
    `default_section` is None for plain RoPE, else the MRoPE section used when the config gives none."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config field 'rope_parameters' must be a dict, got {params!r}")
    params = dict(params)
    theta = params.get("rope_theta", d.get("rope_theta", default_theta))
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", default_partial))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"unsupported rope_type {rope_type!r} (supported: 'default', 'yarn')")
    if not (0.0 < float(partial) <= 1.0):
        raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {partial!r}")
    rotary_dim = int(head_dim * partial)
    if rotary_dim < 2 or rotary_dim % 2:
        raise ConfigError(f"head_dim * partial_rotary_factor = {head_dim * partial} must be an even integer >= 2")
    section = None
    if default_section is not None:
        section = tuple(int(s) for s in params.get("mrope_section", default_section))
        # The reference assigns slots by the interleave rule whatever the sum (slots past rotary_dim / 2 do not exist).
        if len(section) != 3 or min(section) < 0:
            raise ConfigError(f"mrope_section {list(section)} must have 3 non-negative entries")
    fields: dict[str, Any] = dict(theta=float(theta), partial_rotary_factor=float(partial), mrope_section=section)
    if rope_type == "yarn":
        if params.get("factor") is None:
            raise ConfigError("rope_type 'yarn' needs rope_parameters['factor']")
        fields.update(
            rope_type="yarn",
            factor=float(params["factor"]),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings") or max_position_embeddings
            ),
            beta_fast=float(params.get("beta_fast") or 32),
            beta_slow=float(params.get("beta_slow") or 1),
            attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
        )
        if fields["factor"] < 1.0:
            raise ConfigError(f"YaRN factor must be >= 1, got {fields['factor']}")
    return RopeConfig(**fields)


def parse_text_config(raw: dict[str, Any], model_type: str, tie_word_embeddings: bool | None = None) -> TextConfig:
    """Parse the text part of a config (`raw` is the text config dict) of the given text `model_type`."""
    d = dict(_TEXT_DEFAULTS[model_type])
    d.update({k: v for k, v in raw.items() if v is not None or k in ("mlp_only_layers",)})
    if "num_local_experts" in raw:  # Qwen3-VL-MoE stores num_experts under this name (its attribute_map)
        d["num_experts"] = raw["num_local_experts"]
    if d.get("hidden_act") != "silu":
        raise ConfigError(f"unsupported hidden_act {d.get('hidden_act')!r} (only 'silu')")
    vl = model_type in _VL_TEXT
    n_layers = _int(d, "num_hidden_layers")
    layer_types = None if vl else d.get("layer_types")  # Qwen3-VL: every layer is full attention
    if layer_types is None:
        interval = 1 if vl else (_int(d, "full_attention_interval") if "full_attention_interval" in d else 4)
        layer_types = [LINEAR_ATTENTION if (i + 1) % interval else FULL_ATTENTION for i in range(n_layers)]
    layer_types = tuple(_LEGACY_LAYER_TYPES.get(t, t) if isinstance(t, str) else t for t in layer_types)
    if len(layer_types) != n_layers:
        raise ConfigError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {n_layers}")
    unknown = sorted(set(layer_types) - {LINEAR_ATTENTION, FULL_ATTENTION})
    if unknown:
        raise ConfigError(f"unknown layer type(s) {unknown} in layer_types")

    heads = _int(d, "num_attention_heads")
    kv_heads = heads if d.get("num_key_value_heads") is None else _int(d, "num_key_value_heads")
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if vl:
        hk = hv = dk = dv = conv = 0
    else:
        hk, hv = _int(d, "linear_num_key_heads"), _int(d, "linear_num_value_heads")
        dk, dv = _int(d, "linear_key_head_dim"), _int(d, "linear_value_head_dim")
        conv = _int(d, "linear_conv_kernel_dim")
        if hv % hk:
            raise ConfigError(f"linear_num_value_heads {hv} is not a multiple of linear_num_key_heads {hk}")

    if model_type in ("qwen3_5_text", "qwen3_vl_text"):
        num_experts, moe_layers = 0, (False,) * n_layers
    elif model_type == "qwen3_5_moe_text":
        num_experts, moe_layers = _int(d, "num_experts"), (True,) * n_layers
    else:
        num_experts = _int(d, "num_experts", minimum=0)
        mlp_only = set(d.get("mlp_only_layers") or [])
        step = _int(d, "decoder_sparse_step")
        moe_layers = tuple(i not in mlp_only and num_experts > 0 and (i + 1) % step == 0 for i in range(n_layers))
    if any(moe_layers) and not 1 <= _int(d, "num_experts_per_tok") <= num_experts:
        raise ConfigError(f"num_experts_per_tok {d['num_experts_per_tok']} must be in [1, num_experts={num_experts}]")

    head_dim = _int(d, "head_dim") if d.get("head_dim") is not None else _int(d, "hidden_size") // heads
    max_pos = _int(d, "max_position_embeddings")
    tie = d["tie_word_embeddings"] if tie_word_embeddings is None else tie_word_embeddings
    if vl:
        rope = _parse_rope(d, head_dim, max_pos, (24, 20, 20), default_theta=500000.0, default_partial=1.0)
    else:
        rope = _parse_rope(d, head_dim, max_pos, None if model_type == "qwen3_next" else (11, 11, 10))
    has_moe = any(moe_layers)
    return TextConfig(
        model_type=model_type,
        vocab_size=_int(d, "vocab_size"),
        hidden_size=_int(d, "hidden_size"),
        num_hidden_layers=n_layers,
        layer_types=layer_types,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        attention_bias=bool(d["attention_bias"]),
        rope=rope,
        linear_num_key_heads=hk,
        linear_num_value_heads=hv,
        linear_key_head_dim=dk,
        linear_value_head_dim=dv,
        linear_conv_kernel_dim=conv,
        moe_layers=moe_layers,
        intermediate_size=int(d.get("intermediate_size") or 0) if not all(moe_layers) else 0,
        num_experts=num_experts,
        num_experts_per_tok=int(d.get("num_experts_per_tok") or 0) if has_moe else 0,
        moe_intermediate_size=int(d.get("moe_intermediate_size") or 0) if has_moe else 0,
        # Qwen3-VL-MoE has no shared expert.
        shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0) if has_moe and not vl else 0,
        # Qwen3.5-MoE and Qwen3-VL-MoE have no such field: their routers always renormalize the top-k probabilities.
        norm_topk_prob=bool(d.get("norm_topk_prob", True)) if model_type == "qwen3_next" else True,
        rms_norm_eps=float(d["rms_norm_eps"]),
        tie_word_embeddings=bool(tie),
        max_position_embeddings=max_pos,
        zero_centered_norm=not vl,
        attention_output_gate=not vl,
    )


def parse_vision_config(raw: dict[str, Any], deepstack: bool) -> VisionConfig:
    """Parse a `vision_config` dict (class defaults of `Qwen3VLVisionConfig` / `Qwen3_5VisionConfig`)."""
    d = dict(_VISION_DEFAULTS)
    d.update({k: v for k, v in raw.items() if v is not None})
    for alias, name in (("num_attention_heads", "num_heads"), ("num_hidden_layers", "depth")):  # attribute_map
        if raw.get(alias) is not None:
            d[name] = raw[alias]
    if d.get("hidden_act") != "gelu_pytorch_tanh":
        raise ConfigError(f"unsupported vision hidden_act {d.get('hidden_act')!r} (only 'gelu_pytorch_tanh')")
    rope = d.get("rope_parameters") or {}
    indexes = tuple(int(i) for i in d.get("deepstack_visual_indexes", (8, 16, 24))) if deepstack else ()
    cfg = VisionConfig(
        depth=_int(d, "depth"),
        hidden_size=_int(d, "hidden_size"),
        intermediate_size=_int(d, "intermediate_size"),
        num_heads=_int(d, "num_heads"),
        in_channels=_int(d, "in_channels"),
        patch_size=_int(d, "patch_size"),
        temporal_patch_size=_int(d, "temporal_patch_size"),
        spatial_merge_size=_int(d, "spatial_merge_size"),
        out_hidden_size=_int(d, "out_hidden_size"),
        num_position_embeddings=_int(d, "num_position_embeddings"),
        deepstack_visual_indexes=indexes,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )
    side = int(cfg.num_position_embeddings**0.5)
    if side * side != cfg.num_position_embeddings:
        raise ConfigError(f"num_position_embeddings {cfg.num_position_embeddings} is not a square")
    if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
        raise ConfigError(f"vision hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} must be a multiple of 4")
    bad = [i for i in indexes if not 0 <= i < cfg.depth]
    if bad:
        raise ConfigError(f"deepstack_visual_indexes {bad} outside the {cfg.depth} vision blocks")
    return cfg


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Parse a Hugging Face `config.json` dict of a supported model type."""
    if not isinstance(raw, dict):
        raise ConfigError("config.json must hold a JSON object")
    model_type = raw.get("model_type")
    if model_type in _COMPOSITE:
        text_raw = raw.get("text_config") or {}
        if not isinstance(text_raw, dict):
            raise ConfigError("config field 'text_config' must be an object")
        # The composite model's own `tie_word_embeddings` (default False) is the one the reference reads.
        text = parse_text_config(text_raw, _COMPOSITE[model_type], bool(raw.get("tie_word_embeddings", False)))
        vision_raw = raw.get("vision_config") or {}
        if not isinstance(vision_raw, dict):
            raise ConfigError("config field 'vision_config' must be an object")
        vision = parse_vision_config(vision_raw, _DEEPSTACK[model_type])
        defaults = _TOKEN_IDS[model_type]
        names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        ids = {name: int(raw.get(name, default)) for name, default in zip(names, defaults)}
        return ModelConfig(model_type=model_type, text=text, text_prefix="model.language_model.", vision=vision, **ids)
    if model_type in _TEXT_DEFAULTS:
        return ModelConfig(model_type=model_type, text=parse_text_config(raw, model_type), text_prefix="model.")
    raise ConfigError(f"unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")


def load_config(path: str | Path) -> ModelConfig:
    """Read and parse `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: no config.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    return parse_config(raw)


def yarn_attention_factor(rope: RopeConfig) -> float:
    """The cos/sin scale of YaRN, as `_compute_yarn_parameters` derives it."""
    if rope.attention_factor is not None:
        return rope.attention_factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
    return mscale(rope.factor)
