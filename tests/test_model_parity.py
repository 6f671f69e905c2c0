"""Whole-model logits against the reference, float32 and bfloat16, for every family and checkpoint layout."""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import SPECS, prompt_batch, reference_logits

import qwen_jax

# float32 parity: both sides compute the same math in float32 with different summation orders; observed differences
# are ~1e-6 relative, so 1e-4 of the largest logit leaves room for rounding but not for a real bug.
RELATIVE_TOLERANCE = 1e-4


def assert_logits_match(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> None:
    valid = mask.astype(bool)
    ours, ref = ours[valid], ref[valid]  # [tokens, vocab]
    tol = RELATIVE_TOLERANCE * np.abs(ref).max()
    err = np.abs(ours - ref).max()
    assert err <= tol, f"max |diff| {err:.3g} > tolerance {tol:.3g}"
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 10 * tol
    assert decisive.mean() > 0.9  # the argmax check below must cover most positions to mean anything
    np.testing.assert_array_equal(ours.argmax(-1)[decisive], ref.argmax(-1)[decisive])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_float32_logits_match_reference(built_models, name):
    built = built_models(name)
    ids, mask = prompt_batch(seed=len(name), length=333, pad=45)
    ours = np.asarray(built.model(ids, mask))
    assert_logits_match(ours, reference_logits(built.reference, ids, mask), mask)


def test_default_positions_follow_the_mask(built_models):
    """Without explicit positions, a left-padded row gets the same logits as the same tokens unpadded."""
    model = built_models("qwen3_5_moe_per_expert").model
    ids, mask = prompt_batch(seed=3, length=200, pad=37)
    padded = np.asarray(model(ids, mask))[1, 37:]
    alone = np.asarray(model(ids[1:, 37:]))[0]
    np.testing.assert_allclose(padded, alone, atol=1e-5 * np.abs(alone).max())


@pytest.mark.parametrize("name", ["qwen3_5_moe_fused", "qwen3_next", "qwen3_5_dense"])
def test_bfloat16_error_is_no_worse_than_reference(built_models, name):
    """Our bf16 error against our fp32 is at most 2x the reference's bf16 error against its fp32, and our bf16
    top-1 agrees with our fp32 at least as often as the reference's does (minus one percentage point)."""
    built = built_models(name)
    ids, mask = prompt_batch(seed=11, length=300, pad=30)
    valid = mask.astype(bool)
    ref32 = reference_logits(built.reference, ids, mask)[valid]
    # A copy: casting the shared reference to bf16 and back would round its weights for every later test.
    ref16 = reference_logits(copy.deepcopy(built.reference).to(torch.bfloat16), ids, mask)[valid]
    ours32 = np.asarray(built.model(ids, mask))[valid]
    ours16 = np.asarray(qwen_jax.load(built.converted_dir, dtype=jnp.bfloat16)(ids, mask))[valid]

    ref_err = np.abs(ref16 - ref32).max() / np.abs(ref32).max()
    our_err = np.abs(ours16 - ours32).max() / np.abs(ours32).max()
    assert our_err <= 2 * ref_err, f"bf16 relative error {our_err:.3g} vs reference {ref_err:.3g}"
    ref_agree = (ref16.argmax(-1) == ref32.argmax(-1)).mean()
    our_agree = (ours16.argmax(-1) == ours32.argmax(-1)).mean()
    assert our_agree >= ref_agree - 0.01, f"top-1 agreement {our_agree:.3f} vs reference {ref_agree:.3f}"


@pytest.mark.parametrize("name", ["qwen3_5_moe_per_expert", "qwen3_next"])
def test_packed_documents_match_the_reference_on_each_document(built_models, name):
    """Three documents packed in one row (boundaries mid-chunk, trailing padding): logits from the training forward
    (hidden states times the output weights) equal the reference's on each document alone."""
    from qwen_jax.model import decoder_outputs, output_weights

    built = built_models(name)
    config = built.model.config.text
    rng = np.random.default_rng(3)
    lengths = [70, 1, 150]
    documents = [rng.integers(0, config.vocab_size, (1, n)) for n in lengths]
    ids = np.zeros((1, 240), np.int32)
    segments = np.zeros((1, 240), np.int32)
    start = 0
    for i, doc in enumerate(documents):
        ids[0, start : start + doc.shape[1]], segments[0, start : start + doc.shape[1]] = doc, i + 1
        start += doc.shape[1]
    params = built.model.params
    out = decoder_outputs(params, config, jnp.asarray(ids), segment_ids=jnp.asarray(segments))
    logits = np.asarray(jnp.einsum("bth,hv->btv", out.hidden, output_weights(params, config)))
    assert out.router_logits.shape[0] == sum(config.moe_layers)
    start = 0
    for doc in documents:
        ref = reference_logits(built.reference, doc, np.ones_like(doc))
        mask = np.ones_like(doc)
        n = doc.shape[1]
        if n > 1:
            assert_logits_match(logits[:, start : start + n], ref, mask)
        else:
            np.testing.assert_allclose(logits[0, start], ref[0, 0], atol=RELATIVE_TOLERANCE * np.abs(ref).max())
        start += n
