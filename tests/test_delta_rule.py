"""The two forms of the gated delta rule against the reference's `torch_chunk_gated_delta_rule` and
`torch_recurrent_gated_delta_rule`, state carrying, padding, and the triangular inverse."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen3_next.modeling_qwen3_next import (
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

from qwen_jax.layers.delta_rule import (
    chunked_gated_delta_rule,
    recurrent_gated_delta_rule,
    unit_lower_triangular_inverse,
)

# Both sides are float32 with different summation orders; outputs and states are O(1), and observed differences are
# below 1e-6, so 2e-5 absolute flags any real error.
ATOL = 2e-5
KEY_HEADS, VALUE_HEADS, KEY_DIM, VALUE_DIM = 2, 6, 16, 8


def random_inputs(seed: int, batch: int = 2, seq: int = 150) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return dict(
        q=f32(batch, seq, KEY_HEADS, KEY_DIM),
        k=f32(batch, seq, KEY_HEADS, KEY_DIM),
        v=f32(batch, seq, VALUE_HEADS, VALUE_DIM),
        # Realistic log decays: -exp(A) * softplus(.) spans slow and fast forgetting.
        g=(-np.exp(f32(batch, seq, VALUE_HEADS)) * np.log1p(np.exp(f32(batch, seq, VALUE_HEADS)))).astype(np.float32),
        beta=(1 / (1 + np.exp(-f32(batch, seq, VALUE_HEADS)))).astype(np.float32),
        state=f32(batch, VALUE_HEADS, KEY_DIM, VALUE_DIM),
    )


def reference(fn, x, initial_state, normalize_qk, **kwargs):
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    o, s = fn(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=None if initial_state is None else t["state"],
              output_final_state=True, use_qk_l2norm_in_kernel=normalize_qk, **kwargs)  # fmt: skip
    return o.numpy(), s.numpy()


@functools.partial(jax.jit, static_argnames=("form", "chunk_size", "normalize_qk"))
def ours(x, state, mask=None, *, form, chunk_size=64, normalize_qk=True):
    kwargs = dict(initial_state=state, mask=mask, normalize_qk=normalize_qk)
    if form == "chunked":
        return chunked_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=chunk_size, **kwargs)
    return recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **kwargs)


def assert_close(a, b):
    np.testing.assert_allclose(np.asarray(a), b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("seq", [150, 37])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference(chunk_size, seq, with_state):
    x = random_inputs(seed=chunk_size + seq, seq=seq)
    state = x["state"] if with_state else None
    ref_chunked = reference(torch_chunk_gated_delta_rule, x, state, True, chunk_size=chunk_size)
    ref_recurrent = reference(torch_recurrent_gated_delta_rule, x, state, True)
    o, s = ours(x, state, form="chunked", chunk_size=chunk_size)
    for ref in (ref_chunked, ref_recurrent):
        assert_close(o, ref[0])
        assert_close(s, ref[1])


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("normalize_qk", [True, False])
def test_recurrent_matches_reference(with_state, normalize_qk):
    x = random_inputs(seed=7, seq=70)
    if not normalize_qk:  # unnormalized keys must stay small for the recurrence to be stable
        x["k"] = x["k"] / np.linalg.norm(x["k"], axis=-1, keepdims=True)
    state = x["state"] if with_state else None
    ref_o, ref_s = reference(torch_recurrent_gated_delta_rule, x, state, normalize_qk)
    o, s = ours(x, state, form="recurrent", normalize_qk=normalize_qk)
    assert_close(o, ref_o)
    assert_close(s, ref_s)
    o, s = ours(x, state, form="chunked", chunk_size=32, normalize_qk=normalize_qk)
    assert_close(o, ref_o)
    assert_close(s, ref_s)


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
@pytest.mark.parametrize("split", [1, 64, 100, 149])
def test_split_sequence_with_carried_state_equals_whole(form, split):
    x = random_inputs(seed=split, seq=150)
    whole_o, whole_s = ours(x, x["state"], form=form, chunk_size=32)
    first = {k: v[:, :split] if k != "state" else v for k, v in x.items()}
    second = {k: v[:, split:] if k != "state" else v for k, v in x.items()}
    o1, s1 = ours(first, x["state"], form=form, chunk_size=32)
    o2, s2 = ours(second, s1, form=form, chunk_size=32)
    assert_close(np.concatenate([o1, o2], axis=1), np.asarray(whole_o))
    assert_close(s2, np.asarray(whole_s))


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_padding_never_touches_the_state(form):
    """Left padding and padding in the middle (as in packing) leave outputs at real positions and the final state
    equal to the run over the real tokens only; an all-padding input leaves the state exactly as it was."""
    x = random_inputs(seed=5, batch=1, seq=90)
    pad = np.ones((1, 90), np.int32)
    pad[:, :13] = 0
    pad[:, 50:61] = 0
    real = pad[0].astype(bool)
    compact = {k: v[:, real] if k != "state" else v for k, v in x.items()}
    o, s = ours(x, x["state"], pad, form=form, chunk_size=16)
    o_ref, s_ref = ours(compact, x["state"], form=form, chunk_size=16)
    assert_close(np.asarray(o)[:, real], np.asarray(o_ref))
    assert_close(s, np.asarray(s_ref))
    _, s_none = ours(x, x["state"], np.zeros_like(pad), form=form, chunk_size=16)
    np.testing.assert_array_equal(np.asarray(s_none), x["state"])


@pytest.mark.parametrize("n", [5, 16, 37, 64])
def test_unit_lower_triangular_inverse(n):
    """Against numpy's inverse, including strongly correlated rows (all-ones strict lower part), where a Neumann or
    doubling series would lose everything to cancellation."""
    rng = np.random.default_rng(n)
    for a in (np.tril(rng.standard_normal((3, n, n)), -1) * 0.3, np.tril(np.ones((1, n, n)), -1)):
        a = a.astype(np.float32)
        expected = np.linalg.inv(np.eye(n) + a.astype(np.float64))
        got = np.asarray(jax.jit(unit_lower_triangular_inverse)(jnp.asarray(a)))
        np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_packed_documents_match_each_document_alone(form):
    """Segments that start mid-chunk, a one-token segment, and trailing padding (id 0): each document's outputs equal
    the reference run on that document alone, and the final state is the last document's."""
    x = random_inputs(seed=11, seq=150)
    segments = np.zeros((2, 150), np.int32)
    segments[0, :40], segments[0, 40], segments[0, 41:130] = 1, 2, 3
    segments[1, :64], segments[1, 64:140] = 1, 2
    o, s = jax.jit(
        lambda x, seg: (chunked_gated_delta_rule if form == "chunked" else recurrent_gated_delta_rule)(
            x["q"], x["k"], x["v"], x["g"], x["beta"], mask=seg > 0, segment_ids=seg,
            **({"chunk_size": 32} if form == "chunked" else {}),
        )
    )({k: v for k, v in x.items() if k != "state"}, segments)  # fmt: skip
    for row in range(2):
        for segment in range(1, segments[row].max() + 1):
            where = np.flatnonzero(segments[row] == segment)
            alone = {k: v[row : row + 1, where] for k, v in x.items() if k != "state"}
            ref_o, ref_s = reference(torch_recurrent_gated_delta_rule, alone, None, True)
            assert_close(np.asarray(o)[row, where], ref_o[0])
        assert_close(np.asarray(s)[row], ref_s[0])
