"""Bias-free (by default) linear projection whose kernel `[in, out]` carries logical axis names for sharding."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

INIT_STD = 0.02  # the reference's `initializer_range`


def Linear(features: int, axes: tuple[str, str], *, name: str, dtype: Any, use_bias: bool = False) -> nn.Dense:
    """`nn.Dense` computing in `dtype`, kernel `[in, out]` named by `axes`, normal(0.02) init like the reference."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )
