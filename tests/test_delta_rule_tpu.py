"""The Pallas TPU kernel of the chunked gated delta rule: in interpret mode on CPU against the XLA path (itself
tested against the reference in test_delta_rule.py), its selection, and its lowering for TPU (Mosaic)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.kernels.delta_rule_tpu import chunked_gated_delta_rule_pallas, unit_lower_triangular_inverse_2d
from qwen_jax.layers.delta_rule import chunked_gated_delta_rule

# Both sides are float32 at HIGHEST precision running the same WY/UT algebra; they differ in summation order and in
# how the triangular inverse is merged (16-row substitution blocks there, 2x2 block merges from 1x1 here). Outputs
# and states are O(1) and observed differences are ~1e-6 of the largest entry, so 1e-5 of it flags real errors.
F32_RTOL = 1e-5
# bfloat16 inputs are cast to float32 identically on both sides; only the output's final rounding to bfloat16 can
# differ (a value next to a rounding boundary), by one bfloat16 ulp: 2^-7 of the value at most.
BF16_RTOL = 2.0**-7


def random_inputs(seed, batch, seq, key_heads, value_heads, key_dim, value_dim, dtype=jnp.float32):
    """q, k `[batch, seq, key_heads, key_dim]`, v `[batch, seq, value_heads, value_dim]`, realistic log decays g and
    betas `[batch, seq, value_heads]` (float32), a random initial state."""
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    return {
        "q": jnp.asarray(f32(batch, seq, key_heads, key_dim), dtype),
        "k": jnp.asarray(f32(batch, seq, key_heads, key_dim), dtype),
        "v": jnp.asarray(f32(batch, seq, value_heads, value_dim), dtype),
        # -exp(A) * softplus(.) spans slow and fast forgetting.
        "g": jnp.asarray(-np.exp(f32(batch, seq, value_heads)) * np.log1p(np.exp(f32(batch, seq, value_heads)))),
        "beta": jnp.asarray(1 / (1 + np.exp(-f32(batch, seq, value_heads)))),
        "state": jnp.asarray(f32(batch, value_heads, key_dim, value_dim)),
    }


@functools.partial(jax.jit, static_argnames=("implementation", "chunk_size", "normalize_qk"))
def run(x, state, mask, *, implementation, chunk_size, normalize_qk=True):
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    kwargs = {"chunk_size": chunk_size, "initial_state": state, "mask": mask, "normalize_qk": normalize_qk}
    if implementation == "pallas":
        return chunked_gated_delta_rule_pallas(*args, **kwargs, interpret=True)
    return chunked_gated_delta_rule(*args, **kwargs, implementation="xla")


def assert_close(got, expected, rtol=F32_RTOL):
    got, expected = (np.asarray(jnp.asarray(a, jnp.float32)) for a in (got, expected))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=F32_RTOL * np.abs(expected).max())


def assert_matches_xla(x, state, mask, chunk_size, rtol=F32_RTOL, **kwargs):
    o, s = run(x, state, mask, implementation="pallas", chunk_size=chunk_size, **kwargs)
    ref_o, ref_s = run(x, state, mask, implementation="xla", chunk_size=chunk_size, **kwargs)
    assert o.dtype == x["v"].dtype and s.dtype == jnp.float32
    assert_close(o, ref_o, rtol)
    assert_close(s, ref_s)
    return o, s


def padding_masks(batch, seq):
    """Row 0 all real, row 1 left padding, row 2 padding in the middle (packing)."""
    mask = np.ones((batch, seq), np.int32)
    mask[1, :13] = 0
    mask[2, 50:61] = 0
    return jnp.asarray(mask)


@pytest.mark.timeout(120)
def test_gqa_padding_and_state_match_xla():
    """GQA (4 value heads on 2 key heads), seq 150 over chunks of 32 (a partial last chunk), a carried initial state,
    left and mid-sequence padding; padding never changes the state."""
    x = random_inputs(1, batch=3, seq=150, key_heads=2, value_heads=4, key_dim=16, value_dim=8)
    mask = padding_masks(3, 150)
    o, s = assert_matches_xla(x, x["state"], mask, chunk_size=32)

    # The mid-padded row equals the XLA path run on its real tokens only.
    real = np.asarray(mask[2]).astype(bool)
    compact = {name: value[2:3, real] if name != "state" else value[2:3] for name, value in x.items()}
    compact_o, compact_s = run(compact, compact["state"], None, implementation="xla", chunk_size=32)
    assert_close(o[2:3, real], compact_o)
    assert_close(s[2:3], compact_s)

    # All padding: the state comes back bit for bit.
    _, s_none = run(x, x["state"], jnp.zeros_like(mask), implementation="pallas", chunk_size=32)
    np.testing.assert_array_equal(np.asarray(s_none), np.asarray(x["state"]))


@pytest.mark.timeout(120)
def test_sequence_shorter_than_chunk_without_state_or_mask_matches_xla():
    """37 tokens, chunk 64 (one padded chunk), no initial state, no mask, as many key as value heads, and the
    unnormalized-q/k path (keys scaled to unit norm so the recurrence stays stable)."""
    x = random_inputs(2, batch=2, seq=37, key_heads=3, value_heads=3, key_dim=16, value_dim=8)
    x["k"] = x["k"] / jnp.linalg.norm(x["k"], axis=-1, keepdims=True)
    assert_matches_xla(x, None, None, chunk_size=64, normalize_qk=False)


@pytest.mark.timeout(120)
def test_bfloat16_inputs_match_xla():
    """bfloat16 q, k, v (the state stays float32, the output is bfloat16), GQA, padding and an initial state."""
    x = random_inputs(3, batch=3, seq=100, key_heads=1, value_heads=2, key_dim=16, value_dim=16, dtype=jnp.bfloat16)
    assert_matches_xla(x, x["state"], padding_masks(3, 100), chunk_size=32, rtol=BF16_RTOL)


@pytest.mark.parametrize("n", [5, 37, 64])
def test_unit_lower_triangular_inverse_2d(n):
    """Against numpy's float64 inverse, including the all-ones strict lower part, where a series expansion would
    lose everything to cancellation."""
    rng = np.random.default_rng(n)
    for a in (np.tril(rng.standard_normal((n, n)), -1) * 0.3, np.tril(np.ones((n, n)), -1)):
        expected = np.linalg.inv(np.eye(n) + a)
        got = np.asarray(jax.jit(unit_lower_triangular_inverse_2d)(jnp.asarray(a, jnp.float32)))
        np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(expected).max()))


def test_selection(monkeypatch):
    """The XLA path off TPU, the kernel on TPU (or when asked for), and a clear error for an unknown name."""
    x = random_inputs(4, batch=1, seq=20, key_heads=1, value_heads=2, key_dim=8, value_dim=8)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])

    def traced(**kwargs):
        return str(jax.make_jaxpr(functools.partial(chunked_gated_delta_rule, chunk_size=16, **kwargs))(*args))

    assert "pallas_call" not in traced()
    assert "pallas_call" in traced(implementation="pallas")
    with pytest.raises(ValueError, match="implementation must be"):
        traced(implementation="triton")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert "pallas_call" in traced()
    assert "pallas_call" not in traced(implementation="xla")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_for_tpu(dtype):
    """Qwen3.5-35B-A3B's delta-net sizes (16 key heads, 32 value heads, key and value dims 128, chunk 64) at 1024
    tokens with a mask and an initial state export for TPU as one Mosaic kernel."""
    batch, seq, key_heads, value_heads, dim = 1, 1024, 16, 32, 128
    structs = (
        jax.ShapeDtypeStruct((batch, seq, key_heads, dim), dtype),
        jax.ShapeDtypeStruct((batch, seq, key_heads, dim), dtype),
        jax.ShapeDtypeStruct((batch, seq, value_heads, dim), dtype),
        jax.ShapeDtypeStruct((batch, seq, value_heads), jnp.float32),
        jax.ShapeDtypeStruct((batch, seq, value_heads), dtype),
        jax.ShapeDtypeStruct((batch, value_heads, dim, dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, seq), jnp.int32),
    )

    def f(q, k, v, g, beta, state, mask):
        return chunked_gated_delta_rule_pallas(q, k, v, g, beta, chunk_size=64, initial_state=state, mask=mask)

    exported = jax.export.export(jax.jit(f), platforms=["tpu"])(*structs)
    assert exported.platforms == ("tpu",)
    assert exported.mlir_module().count("stablehlo.custom_call @tpu_custom_call") == 1
    o, s = exported.out_avals
    assert (o.shape, o.dtype) == ((batch, seq, value_heads, dim), dtype)
    assert (s.shape, s.dtype) == ((batch, value_heads, dim, dim), jnp.float32)
