"""FP8 block-quantized checkpoints: our dequantization against torch's float8_e4m3fn with the same block scales,
including edge blocks, and a whole quantized checkpoint converted."""

from __future__ import annotations

import shutil

import ml_dtypes
import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from qwen_jax.checkpoint.convert import convert
from qwen_jax.checkpoint.format import restore_params
from qwen_jax.checkpoint.fp8 import dequantize_blocks


def quantize(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn weight and float32 scale_inv per block of the last two axes, as FP8 releases store them."""
    rows, cols = weight.shape[-2:]
    nr, nc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(*weight.shape[:-2], nr * block, nc * block)
    padded[..., :rows, :cols] = weight
    tiles = padded.reshape(*weight.shape[:-2], nr, block, nc, block)
    scale = tiles.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / 448.0  # e4m3 max
    q = (tiles / scale[..., :, None, :, None]).reshape(padded.shape)[..., :rows, :cols].to(torch.float8_e4m3fn)
    return q.contiguous(), scale.float()


def torch_dequantize(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> np.ndarray:
    rows, cols = q.shape[-2:]
    full = scale.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :rows, :cols]
    return (q.float() * full).numpy()


def as_numpy_fp8(q: torch.Tensor) -> np.ndarray:
    return q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)


def test_dequantize_matches_torch_with_edge_blocks():
    torch.manual_seed(0)
    for shape in [(300, 200), (3, 260, 130), (64, 64)]:  # edge blocks of 44 x 72, 4 x 2, and a single small block
        weight = torch.randn(shape) * 0.05
        q, scale = quantize(weight)
        ours = dequantize_blocks(as_numpy_fp8(q), scale.numpy())
        np.testing.assert_array_equal(ours, torch_dequantize(q, scale))  # same float32 products, bit for bit
        # And the quantization is faithful: e4m3 keeps ~2 significant digits.
        assert np.abs(ours - weight.numpy()).max() <= 0.07 * np.abs(weight.numpy()).max()


def test_quantized_checkpoint_converts_to_dequantized_weights(built_models, tmp_path):
    src = tmp_path / "fp8"
    shutil.copytree(built_models("qwen3_5_moe_fused").hf_dir, src)
    tensors = {k: torch.from_numpy(v.copy()) for k, v in load_file(src / "model.safetensors").items()}
    quantized = {}
    for key, value in tensors.items():
        if value.ndim >= 2 and ("proj" in key or "experts" in key):
            q, scale = quantize(value.float())
            quantized[key], quantized[key + "_scale_inv"] = q, scale
        else:
            quantized[key] = value
    (src / "model.safetensors").unlink()
    save_file(quantized, src / "model.safetensors", metadata={"format": "pt"})
    convert(src, tmp_path / "out", log=lambda _: None)
    params = restore_params(tmp_path / "out" / "params")
    key = "model.layers.0.linear_attn.in_proj_qkv.weight"
    expected = torch_dequantize(quantized[key], quantized[key + "_scale_inv"]).T.astype(ml_dtypes.bfloat16)
    got = params["layers_0"]["linear_attn"]["in_proj_qkv"]["kernel"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got, expected)
    experts = "model.layers.1.mlp.experts.gate_up_proj"
    expected = np.swapaxes(torch_dequantize(quantized[experts], quantized[experts + "_scale_inv"]), 1, 2)
    np.testing.assert_array_equal(params["layers_1"]["mlp"]["experts"]["gate_up_proj"],
                                  expected.astype(ml_dtypes.bfloat16))  # fmt: skip
