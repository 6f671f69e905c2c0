"""Shared fixtures: tiny random reference models built with `transformers`, saved, and converted once per session.

Shapes are chosen to catch bugs: more value heads than key heads in the delta net, GQA in attention, partial RoPE
(a quarter of head_dim) with a non-trivial MRoPE section, experts with top-2 of 4, randomized norm weights (so a
missing `1 +` shows), and prompts of several hundred tokens that are not multiples of the chunk size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from pathlib import Path
from typing import Any, Callable

# One persistent compilation cache for the session, every program in it however fast it compiled: the subprocess
# tests (the sampler, the trainer, the notebooks) then skip compiling what an earlier process compiled. Set before
# jax is imported, so the test workers and every subprocess read it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The suite is mostly compile time (tiny models, hundreds of distinct programs): without XLA:CPU's LLVM optimization
# passes it runs ~20% faster on CI's 2 cores (graph-level optimizations still run). Unless XLA_FLAGS already
# picks a level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import numpy as np
import pytest
import torch
import transformers

VOCAB = 300
ROPE_MROPE = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
              "mrope_interleaved": True}  # fmt: skip
TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
    linear_conv_kernel_dim=4, rms_norm_eps=1e-6, max_position_embeddings=4096,
)  # fmt: skip
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=24)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, temporal_patch_size=2,
              spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=16)  # fmt: skip
VL_TOKENS = dict(image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293)


def _qwen3_5_dense() -> torch.nn.Module:
    cfg = transformers.Qwen3_5TextConfig(**TEXT, intermediate_size=48, rope_parameters=dict(ROPE_MROPE))
    return transformers.Qwen3_5ForCausalLM(cfg)


def _qwen3_5_dense_tied() -> torch.nn.Module:
    # Tied LM head, a conv kernel of 3 and full attention every 2nd layer.
    cfg = transformers.Qwen3_5TextConfig(**dict(TEXT, linear_conv_kernel_dim=3), intermediate_size=48,
                                         tie_word_embeddings=True, full_attention_interval=2,
                                         rope_parameters=dict(ROPE_MROPE))  # fmt: skip
    return transformers.Qwen3_5ForCausalLM(cfg)


def _qwen3_5_moe(rope: dict | None = None) -> torch.nn.Module:
    cfg = transformers.Qwen3_5MoeTextConfig(**TEXT, **MOE, rope_parameters=dict(rope or ROPE_MROPE))
    return transformers.Qwen3_5MoeForCausalLM(cfg)


def _qwen3_5_moe_deep() -> torch.nn.Module:
    # 10 layers: two repeats of the 3 linear + 1 full pattern, then a partial one (2 linear): a scan of 2 repeats and
    # a segment of its own, or three segments of one with `scan_layers=False`.
    cfg = transformers.Qwen3_5MoeTextConfig(**dict(TEXT, num_hidden_layers=10), **MOE, rope_parameters=dict(ROPE_MROPE))
    return transformers.Qwen3_5MoeForCausalLM(cfg)


def _qwen3_5_moe_yarn() -> torch.nn.Module:
    # original_max_position_embeddings well below the prompt lengths, so the scaling matters.
    return _qwen3_5_moe(dict(ROPE_MROPE, rope_type="yarn", factor=4.0, original_max_position_embeddings=128))


def _qwen3_next() -> torch.nn.Module:
    # Layer 1 dense (mlp_only_layers), and the Qwen3-Next-only router without renormalization.
    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}
    cfg = transformers.Qwen3NextConfig(**TEXT, **MOE, intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=False,
                                       rope_parameters=rope)  # fmt: skip
    return transformers.Qwen3NextForCausalLM(cfg)


def _qwen3_5_vl() -> torch.nn.Module:
    text = dict(TEXT, intermediate_size=48, rope_parameters=dict(ROPE_MROPE))
    cfg = transformers.Qwen3_5Config(text_config=text, vision_config=VISION, **VL_TOKENS)
    return transformers.Qwen3_5ForConditionalGeneration(cfg)


def _qwen3_5_moe_vl() -> torch.nn.Module:
    text = dict(TEXT, **MOE, rope_parameters=dict(ROPE_MROPE))
    cfg = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=VISION, **VL_TOKENS)
    return transformers.Qwen3_5MoeForConditionalGeneration(cfg)


VL_ROPE = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [6, 5, 5], "mrope_interleaved": True}
VL_TEXT = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               head_dim=32, intermediate_size=48, rms_norm_eps=1e-6, rope_parameters=VL_ROPE)  # fmt: skip
DEEPSTACK_VISION = dict(VISION, depth=2, deepstack_visual_indexes=[0, 1])


def _qwen3_vl() -> torch.nn.Module:
    cfg = transformers.Qwen3VLConfig(text_config=dict(VL_TEXT), vision_config=DEEPSTACK_VISION, **VL_TOKENS)
    return transformers.Qwen3VLForConditionalGeneration(cfg)


def _qwen3_vl_moe() -> torch.nn.Module:
    # moe_intermediate_size 24: hidden (64) != 2 * 24, so the fused expert layout is decidable by shape.
    text = dict(VL_TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
    cfg = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=DEEPSTACK_VISION, **VL_TOKENS)
    return transformers.Qwen3VLMoeForConditionalGeneration(cfg)


@dataclasses.dataclass(frozen=True)
class Spec:
    build: Callable[[], torch.nn.Module]
    save_kwargs: dict


SPECS: dict[str, Spec] = {
    "qwen3_5_dense": Spec(_qwen3_5_dense, {}),
    "qwen3_5_dense_tied": Spec(_qwen3_5_dense_tied, {}),
    "qwen3_5_moe_per_expert": Spec(_qwen3_5_moe, {}),  # save_pretrained's default writes per-expert keys
    "qwen3_5_moe_fused": Spec(_qwen3_5_moe, {"save_original_format": False}),
    "qwen3_5_moe_yarn": Spec(_qwen3_5_moe_yarn, {}),
    "qwen3_5_moe_deep": Spec(_qwen3_5_moe_deep, {}),
    "qwen3_next": Spec(_qwen3_next, {}),
    "qwen3_next_fused_experts": Spec(_qwen3_next, {"save_original_format": False}),
    "qwen3_5_vl": Spec(_qwen3_5_vl, {}),
    "qwen3_5_moe_vl": Spec(_qwen3_5_moe_vl, {"max_shard_size": "40KB"}),  # sharded, with an index
    "qwen3_vl": Spec(_qwen3_vl, {}),
    "qwen3_vl_moe": Spec(_qwen3_vl_moe, {}),
}
VL_FAMILIES = ["qwen3_5_vl", "qwen3_5_moe_vl", "qwen3_vl", "qwen3_vl_moe"]


@dataclasses.dataclass
class Built:
    name: str
    reference: torch.nn.Module  # float32, eval mode
    hf_dir: Path
    converted_dir: Path
    model: Any  # qwen_jax.Model, float32


def model_seed(name: str) -> int:
    """A fixed seed per spec name (independent of which other specs exist)."""
    return zlib.crc32(name.encode())


def randomize_norms(module: torch.nn.Module, seed: int) -> None:
    """Norm weights start at 0 (or 1); perturb them so that the norm's exact form matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="session")
def built_models(tmp_path_factory) -> Callable[[str], Built]:
    """`built_models(name)` builds, saves, converts and loads the named tiny model, once per session."""
    import qwen_jax
    from qwen_jax.checkpoint.convert import convert

    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            spec = SPECS[name]
            torch.manual_seed(model_seed(name))
            reference = spec.build().eval()
            randomize_norms(reference, seed=1)
            root = tmp_path_factory.mktemp(name)
            reference.save_pretrained(root / "hf", **spec.save_kwargs)
            convert(root / "hf", root / "converted", log=lambda _: None)
            cache[name] = Built(name, reference, root / "hf", root / "converted", qwen_jax.load(root / "converted"))
        return cache[name]

    return get


def prompt_batch(seed: int, length: int = 320, pad: int = 45) -> tuple[np.ndarray, np.ndarray]:
    """Two rows of `length` slots: the first full, the second left-padded with `pad` slots (token 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB - 10, size=(2, length))
    mask = np.ones((2, length), np.int64)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def text_positions(mask: np.ndarray) -> np.ndarray:
    """Positions counting real tokens only (what generation uses), 0 on padding."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def reference_logits(reference: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = reference(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(text_positions(mask)),
        )
    return out.logits.float().numpy()


def write_vl_tokenizer(directory: Path) -> None:
    """A word-level tokenizer whose vision tokens have the tiny vision-language configs' ids, and a chat template."""
    from test_chat import TEMPLATE
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "what", "is", "in", "the", "picture", "user", "assistant"]
    words += [f"w{i}" for i in range(290 - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(
        ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"]
    )  # fmt: skip  (ids 290..295, as the config's image/video/start/end ids)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "<|im_end|>"}))
