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
    # The delta rule's chunk length for prefill / training (not a checkpoint field).
    chunk_size: int = 64

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
class ModelConfig:
    """A whole checkpoint: its top-level `model_type` and the text decoder (the vision tower comes with issue 4)."""

    model_type: str
    text: TextConfig
    # Where the text decoder's weights live in the Hugging Face checkpoint ("model." or "model.language_model.").
    text_prefix: str

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
# Composite (vision-language) model types and the text model type they hold.
_COMPOSITE = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
SUPPORTED_MODEL_TYPES = tuple(sorted(set(_TEXT_DEFAULTS) | set(_COMPOSITE)))


def _int(d: dict[str, Any], key: str, minimum: int = 1) -> int:
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config field {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _parse_rope(d: dict[str, Any], head_dim: int, max_position_embeddings: int, mrope: bool) -> RopeConfig:
    """Mirror of `RotaryEmbeddingConfigMixin.convert_rope_params_to_dict` + `standardize_rope_params`."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config field 'rope_parameters' must be a dict, got {params!r}")
    params = dict(params)
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"unsupported rope_type {rope_type!r} (supported: 'default', 'yarn')")
    if not (0.0 < float(partial) <= 1.0):
        raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {partial!r}")
    rotary_dim = int(head_dim * partial)
    if rotary_dim < 2 or rotary_dim % 2:
        raise ConfigError(f"head_dim * partial_rotary_factor = {head_dim * partial} must be an even integer >= 2")
    section = None
    if mrope:
        section = tuple(int(s) for s in params.get("mrope_section", [11, 11, 10]))
        if len(section) != 3 or sum(section) != rotary_dim // 2:
            raise ConfigError(
                f"mrope_section {list(section)} must have 3 entries summing to rotary_dim/2 = {rotary_dim // 2}"
            )
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
    if d.get("hidden_act") != "silu":
        raise ConfigError(f"unsupported hidden_act {d.get('hidden_act')!r} (only 'silu')")
    n_layers = _int(d, "num_hidden_layers")
    layer_types = d.get("layer_types")
    if layer_types is None:
        interval = _int(d, "full_attention_interval") if "full_attention_interval" in d else 4
        layer_types = [LINEAR_ATTENTION if (i + 1) % interval else FULL_ATTENTION for i in range(n_layers)]
    layer_types = tuple(layer_types)
    if len(layer_types) != n_layers:
        raise ConfigError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {n_layers}")
    unknown = sorted(set(layer_types) - {LINEAR_ATTENTION, FULL_ATTENTION})
    if unknown:
        raise ConfigError(f"unknown layer type(s) {unknown} in layer_types")

    heads, kv_heads = _int(d, "num_attention_heads"), _int(d, "num_key_value_heads")
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    hk, hv = _int(d, "linear_num_key_heads"), _int(d, "linear_num_value_heads")
    if hv % hk:
        raise ConfigError(f"linear_num_value_heads {hv} is not a multiple of linear_num_key_heads {hk}")

    if model_type == "qwen3_5_text":
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

    head_dim = _int(d, "head_dim")
    max_pos = _int(d, "max_position_embeddings")
    tie = d["tie_word_embeddings"] if tie_word_embeddings is None else tie_word_embeddings
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
        rope=_parse_rope(d, head_dim, max_pos, mrope=model_type != "qwen3_next"),
        linear_num_key_heads=hk,
        linear_num_value_heads=hv,
        linear_key_head_dim=_int(d, "linear_key_head_dim"),
        linear_value_head_dim=_int(d, "linear_value_head_dim"),
        linear_conv_kernel_dim=_int(d, "linear_conv_kernel_dim"),
        moe_layers=moe_layers,
        intermediate_size=int(d.get("intermediate_size") or 0) if not all(moe_layers) else 0,
        num_experts=num_experts,
        num_experts_per_tok=int(d.get("num_experts_per_tok") or 0) if any(moe_layers) else 0,
        moe_intermediate_size=int(d.get("moe_intermediate_size") or 0) if any(moe_layers) else 0,
        shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0) if any(moe_layers) else 0,
        # Qwen3.5-MoE removed the field: its router always renormalizes the top-k probabilities.
        norm_topk_prob=bool(d.get("norm_topk_prob", True)) if model_type == "qwen3_next" else True,
        rms_norm_eps=float(d["rms_norm_eps"]),
        tie_word_embeddings=bool(tie),
        max_position_embeddings=max_pos,
    )


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
        return ModelConfig(model_type=model_type, text=text, text_prefix="model.language_model.")
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
