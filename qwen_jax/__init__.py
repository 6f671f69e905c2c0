"""qwen-jax: Qwen3.5, Qwen3-Next and Qwen3-VL in JAX.

    import qwen_jax
    model = qwen_jax.load("path/to/converted")      # tools/convert.py writes such a directory
    logits = model(input_ids, attention_mask)        # [batch, seq, vocab]

Importing this package is cheap; jax loads on first use of `load`, `Model` or `forward`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load", "Model", "forward", "generate", "stream"]


def __getattr__(name: str) -> Any:
    if name in ("load", "Model"):
        from qwen_jax import api

        return getattr(api, name)
    if name in ("generate", "stream"):
        from qwen_jax import generation

        return getattr(generation, name)
    if name == "forward":
        from qwen_jax.model import forward

        return forward
    raise AttributeError(f"module 'qwen_jax' has no attribute {name!r}")
