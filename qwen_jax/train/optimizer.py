"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, and frozen parameters.

Parameters are addressed by their slash-joined tree path (`embed_tokens/embedding`, `layers/0/1/mlp/gate/kernel`
in the stacked layout, `visual/...`); `frozen` patterns (`fnmatch`) select parameters that get no update (optax's
`set_to_zero`, through `multi_transform`), so their optimizer state is empty. Clipping is over the trainable
gradients' global norm. Weight decay applies to matrices only (not norms, biases, `A_log`, `dt_bias`, conv
kernels keep it as the 2-D weights they are). Gradient accumulation is the train step's (`qwen_jax.train.trainer`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import jax
import optax

from qwen_jax.errors import InputError
from qwen_jax.stacking import STACKED

FROZEN, TRAINABLE = "frozen", "trainable"


def param_path(path: tuple) -> str:
    """A tree path (jax key entries) -> "a/b/0/c"."""
    parts = []
    for entry in path:
        for attribute in ("key", "idx", "name"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
    return "/".join(parts)


def frozen_labels(params: Any, patterns: Sequence[str]) -> Any:
    """A tree like `params` of "frozen" / "trainable" labels; a pattern that matches nothing is an error."""
    used = set()

    def label(path: tuple, _: Any) -> str:
        name = param_path(path)
        hits = [p for p in patterns if fnmatch.fnmatchcase(name, p)]
        used.update(hits)
        return FROZEN if hits else TRAINABLE

    labels = jax.tree.map_with_path(label, params)
    unused = [p for p in patterns if p not in used]
    if unused:
        raise InputError(f"frozen pattern(s) {', '.join(map(repr, unused))} match no parameter")
    return labels


def decay_mask(params: Any) -> Any:
    """True on the leaves weight decay applies to: matrices, i.e. 2+ dimensions besides a stacked layer axis."""

    def is_matrix(path: tuple, x: Any) -> bool:
        stacked = param_path(path).split("/")[0] == STACKED
        return x.ndim - int(stacked) >= 2

    return jax.tree.map_with_path(is_matrix, params)


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int, end_fraction: float) -> optax.Schedule:
    """0 -> `peak` linearly over `warmup_steps`, then cosine down to `peak * end_fraction` at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=peak * end_fraction,
    )


def make_optimizer(
    params: Any,
    *,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    clip_norm: float = 1.0,
    frozen: Sequence[str] = (),
) -> optax.GradientTransformation:
    """AdamW after global-norm clipping on the trainable parameters; nothing on the `frozen` ones."""
    trainable = optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask),
    )
    if not frozen:
        return trainable
    return optax.multi_transform({TRAINABLE: trainable, FROZEN: optax.set_to_zero()}, frozen_labels(params, frozen))
