"""Qwen3-VL-MoE fused expert layouts: the official files store gate_up_proj [E, H, 2I] and down_proj [E, I, H];
transformers 5.x writes [E, 2I, H] and [E, H, I]. The converter decides by shape, by the recorded
transformers_version where shapes cannot tell (hidden == 2 * moe_intermediate), and by --expert-layout; it never
guesses silently."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import DEEPSTACK_VISION, VL_TEXT, VL_TOKENS, prompt_batch, reference_logits
from safetensors.numpy import load_file, save_file
from test_model_parity import assert_logits_match

import qwen_jax
from qwen_jax.checkpoint.convert import convert

REPO = Path(__file__).resolve().parent.parent


def to_legacy_layout(directory: Path) -> None:
    """Rewrite a transformers-5 checkpoint's fused experts into the official release's transposed layout."""
    file = directory / "model.safetensors"
    tensors = load_file(file)
    for key in tensors:
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors[key] = np.ascontiguousarray(np.swapaxes(tensors[key], 1, 2))
    save_file(tensors, file, metadata={"format": "pt"})


def forget_transformers_version(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.pop("transformers_version", None)
    (directory / "config.json").write_text(json.dumps(config))


def check_logits(reference, converted: Path) -> None:
    ids, mask = prompt_batch(seed=2, length=120, pad=20)
    assert_logits_match(np.asarray(qwen_jax.load(converted)(ids, mask)), reference_logits(reference, ids, mask), mask)


def test_legacy_layout_decided_by_shape(built_models, tmp_path):
    built = built_models("qwen3_vl_moe")  # hidden 64, moe_intermediate 24: shapes differ between the layouts
    src = tmp_path / "legacy"
    shutil.copytree(built.hf_dir, src)
    to_legacy_layout(src)
    convert(src, tmp_path / "out", log=lambda _: None)
    assert json.loads((tmp_path / "out" / "qwen_jax.json").read_text())["expert_layout"] == "legacy"
    check_logits(built.reference, tmp_path / "out")


@pytest.fixture(scope="module")
def ambiguous_model(tmp_path_factory):
    """hidden 64 == 2 * moe_intermediate 32: [E, 2I, H] and [E, H, 2I] have the same shape."""
    torch.manual_seed(5)
    text = dict(VL_TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    cfg = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=DEEPSTACK_VISION, **VL_TOKENS)
    reference = transformers.Qwen3VLMoeForConditionalGeneration(cfg).eval()
    directory = tmp_path_factory.mktemp("ambiguous") / "hf"
    reference.save_pretrained(directory)
    return reference, directory


def test_ambiguous_layout_follows_transformers_version(ambiguous_model, tmp_path):
    reference, src = ambiguous_model
    convert(src, tmp_path / "out", log=lambda _: None)  # config.json records transformers 5.23.0 -> [E, 2I, H]
    check_logits(reference, tmp_path / "out")


def test_ambiguous_layout_without_version_is_an_error_unless_told(ambiguous_model, tmp_path):
    reference, original = ambiguous_model
    src = tmp_path / "legacy"
    shutil.copytree(original, src)
    to_legacy_layout(src)
    forget_transformers_version(src)
    result = subprocess.run([sys.executable, "tools/convert.py", str(src), str(tmp_path / "out")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0 and "--expert-layout" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    result = subprocess.run([sys.executable, "tools/convert.py", str(src), str(tmp_path / "out"), "--expert-layout",
                             "legacy"], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    check_logits(reference, tmp_path / "out")
