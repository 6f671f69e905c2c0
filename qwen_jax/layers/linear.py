"""Bias-free (by default) linear projection whose kernel `[in, out]` carries logical axis names for sharding."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

INIT_STD = 0.02  # the reference's `initializer_range`


def dot_general(
    lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None, preferred_element_type: Any = None
) -> jax.Array:
    """`lax.dot_general` that accumulates low-precision (bfloat16) operands in float32 and returns their dtype.

    On CPU a low-precision product with a single row (a decode step at batch 1) is computed on that row twice:
    XLA:CPU sends one-row bfloat16 products to a slow matrix-vector path (a [1, 512] x [512, 32768] product ran
    12x slower than the same product of two rows on this project's 2-core Xeon)."""
    dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    if jnp.dtype(jnp.result_type(lhs, rhs)).itemsize >= 4:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=dtype)
    (lhs_contracting, _), (lhs_batch, _) = dimension_numbers
    rows = lhs.size // math.prod(lhs.shape[d] for d in lhs_contracting)
    twice = rows == 1 and not lhs_batch and 0 not in lhs_contracting and jax.default_backend() == "cpu"
    if twice:
        lhs = jnp.concatenate([lhs, lhs], axis=0)
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=jnp.float32)
    return (out[:1] if twice else out).astype(dtype)


def Linear(features: int, axes: tuple[str, str], *, name: str, dtype: Any, use_bias: bool = False) -> nn.Dense:
    """`nn.Dense` computing in `dtype`, kernel `[in, out]` named by `axes`, normal(0.02) init like the reference."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=dtype,
        dot_general=dot_general,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )
