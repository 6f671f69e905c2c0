"""FP8 block-quantized checkpoints (the official `-FP8` releases): a weight stored as float8_e4m3 with a sibling
`<name>_scale_inv` holding one float32 scale per 128 x 128 block (edge blocks smaller) is dequantized on read:
`w[..., i, j] = w_fp8[..., i, j] * scale_inv[..., i // 128, j // 128]`, to bfloat16."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from qwen_jax.errors import InputError

SCALE_SUFFIX = "_scale_inv"
BLOCK = 128
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


def dequantize_blocks(weight: np.ndarray, scale_inv: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """float32 `weight * scale_inv` broadcast over `block x block` tiles of the last two axes."""
    rows, cols = weight.shape[-2:]
    expected = (*weight.shape[:-2], -(-rows // block), -(-cols // block))
    if scale_inv.shape != expected:
        raise InputError(f"block scales of shape {scale_inv.shape} do not fit a weight of {weight.shape}")
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block, axis=-2), block, axis=-1)[..., :rows, :cols]
    return weight.astype(np.float32) * scale


class DequantizingReader:
    """A view of a `SafetensorsCheckpoint` in which FP8 weights with block scales read as bfloat16 and the scale
    tensors themselves disappear."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        keys = checkpoint.keys()
        self.scaled = {k[: -len(SCALE_SUFFIX)] for k in keys if k.endswith(SCALE_SUFFIX)}
        for key in self.scaled:
            if key not in checkpoint.key_file:
                raise InputError(f"{key}{SCALE_SUFFIX} has no weight {key}")
            if checkpoint.info(key)[0] not in FP8_DTYPES:
                raise InputError(f"{key} has block scales but is stored as {checkpoint.info(key)[0]}, not FP8")
        self.key_file = {k: v for k, v in checkpoint.key_file.items() if not k.endswith(SCALE_SUFFIX)}
        self.files = checkpoint.files
        self.index_file = checkpoint.index_file

    def keys(self) -> list[str]:
        return list(self.key_file)

    def info(self, key: str) -> tuple[str, tuple[int, ...]]:
        dtype, shape = self.checkpoint.info(key)
        return ("BF16" if key in self.scaled else dtype), shape

    def nbytes(self, key: str) -> int:
        scales = self.checkpoint.nbytes(key + SCALE_SUFFIX) if key in self.scaled else 0
        return self.checkpoint.nbytes(key) + scales

    def read(self, key: str) -> np.ndarray:
        weight = self.checkpoint.read(key)
        if key not in self.scaled:
            return weight
        return dequantize_blocks(weight, self.checkpoint.read(key + SCALE_SUFFIX)).astype(ml_dtypes.bfloat16)
