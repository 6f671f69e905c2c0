"""Cached forward: chunked prefill followed by single-token decode steps equals one full forward, and a prefill
split anywhere equals one prefill, in logits and in the final conv and recurrent states."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from conftest import prompt_batch, text_positions
from test_model_parity import RELATIVE_TOLERANCE

from qwen_jax.cache import init_cache
from qwen_jax.model import compute_dtype, forward, forward_with_cache

FAMILIES = ["qwen3_5_moe_per_expert", "qwen3_next", "qwen3_5_dense"]


@functools.partial(jax.jit, static_argnames=("config",))
def step(params, config, ids, positions, mask, cache):
    return forward_with_cache(params, config, ids, positions, cache, mask)


def run_in_pieces(model, ids, mask, bounds, max_len):
    """Feed ids in the pieces given by `bounds`; returns (logits [batch, seq, vocab], final cache)."""
    params, config = model.params, model.config.text
    cache = init_cache(config, ids.shape[0], max_len, compute_dtype(params))
    positions = text_positions(mask)
    logits = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out, cache = step(params, config, ids[:, a:b], positions[:, a:b], mask[:, a:b], cache)
        logits.append(np.asarray(out))
    return np.concatenate(logits, axis=1), cache


@pytest.mark.parametrize("name", FAMILIES)
def test_chunked_prefill_then_decode_equals_full_forward(built_models, name):
    model = built_models(name).model
    ids, mask = prompt_batch(seed=21, length=300, pad=45)
    full = np.asarray(forward(model.params, model.config.text, ids, mask))
    # Prefill pieces of uneven sizes (crossing the 64-token delta-rule chunks), then 12 single-token decode steps.
    bounds = [0, 100, 288, *range(289, 301)]
    pieces, _ = run_in_pieces(model, ids, mask, bounds, max_len=320)
    valid = mask.astype(bool)
    err = np.abs(pieces - full)[valid].max()
    assert err <= RELATIVE_TOLERANCE * np.abs(full[valid]).max(), err


@pytest.mark.parametrize("name", ["qwen3_5_moe_per_expert", "qwen3_next"])
def test_prefill_split_anywhere_equals_one_prefill(built_models, name):
    model = built_models(name).model
    ids, mask = prompt_batch(seed=22, length=200, pad=37)
    whole_logits, whole = run_in_pieces(model, ids, mask, [0, 200], max_len=200)
    for split in (1, 131):
        logits, cache = run_in_pieces(model, ids, mask, [0, split, 200], max_len=200)
        valid = mask.astype(bool)
        np.testing.assert_allclose(logits[valid], whole_logits[valid], atol=1e-5 * np.abs(whole_logits).max())
        # Every layer's conv + recurrent states, keys and values.
        for a, b in zip(jax.tree.leaves(cache.layers), jax.tree.leaves(whole.layers), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
