"""The CPU grouped matmul (tiled scan) against a per-group numpy product, and its gradients against
`lax.ragged_dot`'s (dense on CPU: an independent implementation)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.layers.grouped_matmul import (
    _tiled_grouped_ffn,
    _tiled_grouped_matmul,
    grouped_ffn,
    grouped_matmul,
    tile_rows,
)


def reference(x, w, sizes):
    out, start = np.zeros((x.shape[0], w.shape[2])), 0
    for g, n in enumerate(sizes):
        out[start : start + n] = x[start : start + n].astype(np.float64) @ w[g].astype(np.float64)
        start += n
    return out


def case(seed, rows, groups, kind):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 12)).astype(np.float32)
    w = rng.standard_normal((groups, 12, 10)).astype(np.float32)
    if kind == "skewed":  # one group takes (almost) everything, the others are empty
        sizes = np.zeros(groups, np.int32)
        sizes[groups // 2] = rows - 1
    elif kind == "partial":  # rows past the groups (copies for experts held elsewhere) stay zero
        sizes = np.bincount(rng.integers(0, groups, rows // 2), minlength=groups).astype(np.int32)
    else:
        sizes = np.bincount(rng.integers(0, groups, rows), minlength=groups).astype(np.int32)
    return x, w, sizes


@pytest.mark.parametrize("tile", [8, 16, 128])
@pytest.mark.parametrize(("rows", "groups"), [(1, 4), (37, 5), (300, 7), (64, 64)])
@pytest.mark.parametrize("kind", ["uniform", "skewed", "partial"])
def test_tiled_equals_per_group_products(tile, rows, groups, kind):
    x, w, sizes = case(rows * groups, rows, groups, kind)
    ours = jax.jit(functools.partial(_tiled_grouped_matmul, tile=tile))(x, w, sizes)
    np.testing.assert_allclose(np.asarray(ours), reference(x, w, sizes), rtol=1e-5, atol=1e-5)  # f32, 12-term dots


def test_default_path_on_cpu_is_the_tiled_one_and_exact():
    x, w, sizes = case(0, 200, 6, "uniform")
    assert jax.default_backend() == "cpu"
    tiled = _tiled_grouped_matmul(x, w, sizes, tile_rows(200, 6))
    np.testing.assert_array_equal(np.asarray(jax.jit(grouped_matmul)(x, w, sizes)), np.asarray(tiled))
    hlo = jax.jit(grouped_matmul).lower(x, w, sizes).as_text()
    assert "ragged" not in hlo  # the dense CPU lowering of ragged_dot is not what runs


def test_bfloat16_inputs_accumulate_in_float32():
    x, w, sizes = case(1, 120, 3, "uniform")
    x16, w16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    ours = jax.jit(grouped_matmul)(x16, w16, sizes)
    assert ours.dtype == jnp.bfloat16
    exact = reference(np.asarray(x16, np.float32), np.asarray(w16, np.float32), sizes)
    # One bfloat16 rounding of the float32 result: relative error <= 2^-8.
    np.testing.assert_allclose(np.asarray(ours, np.float32), exact, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("kind", ["uniform", "skewed", "partial"])
def test_gradients_equal_ragged_dot(kind):
    x, w, sizes = case(2, 90, 5, kind)
    cotangent = np.random.default_rng(3).standard_normal((90, 10)).astype(np.float32)

    def grads(fn):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w, sizes) * cotangent), argnums=(0, 1)))(x, w)

    ours, theirs = grads(grouped_matmul), grads(jax.lax.ragged_dot)
    for a, b in zip(ours, theirs):
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)  # f32 sums of ~90 terms


def swiglu(h):
    return jax.nn.silu(h[:, :5]) * h[:, 5:]


def ffn_case(seed, rows, groups, kind):
    x, gate_up, sizes = case(seed, rows, groups, kind)  # gate_up [groups, 12, 10]: 5 gate and 5 up features
    down = np.random.default_rng(seed + 1).standard_normal((groups, 5, 7)).astype(np.float32)
    return x, gate_up, down, sizes


def ffn_reference(x, gate_up, down, sizes):
    h = reference(x, gate_up, sizes)
    h = h[:, :5] / (1 + np.exp(-h[:, :5])) * h[:, 5:]
    return reference(h, down, sizes)


@pytest.mark.parametrize("tile", [4, 16, 128])
@pytest.mark.parametrize(("rows", "groups"), [(1, 4), (37, 5), (64, 64)])
@pytest.mark.parametrize("kind", ["uniform", "skewed", "partial"])
def test_tiled_ffn_equals_per_group_ffn(tile, rows, groups, kind):
    """Both products of each tile in one loop step: each row's gate/up product, SwiGLU and down product with its
    own group's matrices; rows past the groups stay zero."""
    x, gate_up, down, sizes = ffn_case(rows * groups, rows, groups, kind)
    tiled = functools.partial(_tiled_grouped_ffn, tile=tile, activation=swiglu)
    ours = jax.jit(tiled)(x, gate_up, down, sizes)
    np.testing.assert_allclose(np.asarray(ours), ffn_reference(x, gate_up, down, sizes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["uniform", "partial"])
def test_ffn_gradients_equal_two_ragged_dots(kind):
    x, gate_up, down, sizes = ffn_case(4, 90, 5, kind)
    cotangent = np.random.default_rng(5).standard_normal((90, 7)).astype(np.float32)

    def two_ragged_dots(x, gate_up, down, sizes, activation):
        return jax.lax.ragged_dot(activation(jax.lax.ragged_dot(x, gate_up, sizes)), down, sizes)

    def grads(fn):
        loss = lambda x, gate_up, down: jnp.sum(fn(x, gate_up, down, sizes, swiglu) * cotangent)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, gate_up, down)

    for a, b in zip(grads(grouped_ffn), grads(two_ragged_dots)):
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)  # f32 sums of ~90 terms


def test_tile_size_rule():
    assert tile_rows(1, 64) == 4 and tile_rows(64, 64) == 4  # decode-sized: smallest tile
    assert tile_rows(512, 64) == 8
    assert tile_rows(4096, 64) == 64 and tile_rows(16384, 64) == 256 and tile_rows(10**6, 8) == 256
