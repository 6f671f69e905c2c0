"""The decoder as scans over stacked repeats of its layer pattern (`scan_layers=True`, the accelerator default) or
as one segment per repeat (False, the CPU default): the same logits and tokens as the reference either way."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import prompt_batch, reference_logits
from test_generation import left_padded_prompts, reference_greedy
from test_model_parity import assert_logits_match

import qwen_jax
from qwen_jax.stacking import Segment, layer_segments

DEEP = "qwen3_5_moe_deep"  # 10 layers: 2 repeats of (3 linear, 1 full), then 2 linear


@pytest.fixture(scope="module")
def deep(built_models):
    built = built_models(DEEP)
    return built, {scan: qwen_jax.load(built.converted_dir, scan_layers=scan) for scan in (True, False)}


def test_segments_of_each_layout(deep):
    _, models = deep
    assert layer_segments(models[True].config.text) == (Segment(0, 4, 2), Segment(8, 2, 1))
    assert layer_segments(models[False].config.text) == (Segment(0, 4, 1), Segment(4, 4, 1), Segment(8, 2, 1))
    leaf = lambda model, s: model.params["layers"][s][0]["input_layernorm"]["weight"]
    assert leaf(models[True], 0).shape[0] == 2 and leaf(models[False], 0).shape[0] == 1


def test_both_layouts_match_the_reference(deep):
    built, models = deep
    ids, mask = prompt_batch(seed=5, length=333, pad=45)
    ref = reference_logits(built.reference, ids, mask)
    scanned, unscanned = (np.asarray(models[scan](ids, mask)) for scan in (True, False))
    assert_logits_match(scanned, ref, mask)
    assert_logits_match(unscanned, ref, mask)
    # The same math in the same order: only XLA's fusion choices differ.
    np.testing.assert_allclose(scanned, unscanned, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_both_layouts_generate_the_reference_tokens(deep):
    """Greedy decode through the cache of each layout (one cache entry per segment) against the reference's."""
    built, models = deep
    new = 24
    ids, mask = left_padded_prompts(seed=2, lengths=(7, 150))
    ref_tokens, cuts = reference_greedy(built.reference, ids, mask, new)
    assert min(cuts) >= 16, cuts
    for scan, model in models.items():
        ours = qwen_jax.generate(model, ids, mask, max_new_tokens=new, pad_token_id=0)
        for row, cut in enumerate(cuts):
            np.testing.assert_array_equal(ours[row, :cut], ref_tokens[row, :cut], err_msg=f"scan_layers={scan}")


def test_parameters_of_another_layout_are_refused(deep):
    _, models = deep
    with pytest.raises(ValueError, match="stacked for another scan_layers"):
        qwen_jax.Model(models[False].config, models[True].params)(np.ones((1, 4), np.int64))
