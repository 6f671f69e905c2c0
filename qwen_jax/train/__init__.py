"""Training: `python -m qwen_jax.train --config RECIPE` or `train(load_recipe(RECIPE))`.

Modules: `data` (the grain pipeline), `loss` (chunked cross-entropy, MoE load balancing), `optimizer` (AdamW,
schedule, clipping, frozen parameters), `recipe` (the JSON training config), `trainer` (state, step, loop,
checkpoints), `evaluate` (held-out loss, unigram baseline), `model_dir` (the trained model directory).
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_recipe", "make_recipe", "train"]


def __getattr__(name: str) -> Any:
    if name in ("load_recipe", "make_recipe"):
        from qwen_jax.train import recipe

        return getattr(recipe, name)
    if name == "train":
        from qwen_jax.train.trainer import train

        return train
    raise AttributeError(f"module 'qwen_jax.train' has no attribute {name!r}")
