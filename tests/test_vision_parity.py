"""Vision-language logits against the reference for the four families: one image, two images of different sizes,
a video of three temporal patches, an image and a video together, and a left-padded batch of two such prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import VL_FAMILIES, VL_TOKENS, VOCAB
from test_model_parity import assert_logits_match

IMAGE, VIDEO, START, END = (VL_TOKENS[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                     "vision_end_token_id"))  # fmt: skip
PATCH_DIM = 3 * 2 * 16 * 16


def build_prompt(rng, parts):
    """parts: ("text", n) | ("image", (t, h, w)) | ("video", (t, h, w)). A video becomes, per temporal patch, a few
    timestamp text tokens then start + pads + end, as the processor writes it. -> (ids, types, image grids, video
    grids)."""
    ids, types, images, videos = [], [], [], []

    def text(n):
        ids.extend(rng.integers(1, VOCAB - 20, n).tolist())
        types.extend([0] * n)

    for kind, arg in parts:
        if kind == "text":
            text(arg)
            continue
        t, h, w = arg
        pads = h * w // 4
        if kind == "image":
            images.append(arg)
            ids.extend([START] + [IMAGE] * pads + [END])
            types.extend([0] + [1] * pads + [0])
        else:
            videos.append(arg)
            for _ in range(t):
                text(3)  # "<1.5 seconds>"
                ids.extend([START] + [VIDEO] * pads + [END])
                types.extend([0] + [2] * pads + [0])
    return ids, types, images, videos


SCENARIOS = {
    "one_image": [[("text", 40), ("image", (1, 4, 6)), ("text", 260)]],
    "two_images": [[("text", 20), ("image", (1, 4, 6)), ("text", 30), ("image", (1, 8, 4)), ("text", 250)]],
    "video": [[("text", 25), ("video", (3, 4, 4)), ("text", 270)]],
    "image_and_video": [[("text", 10), ("image", (1, 6, 4)), ("text", 15), ("video", (3, 4, 6)), ("text", 260)]],
    "padded_batch": [
        [("text", 10), ("image", (1, 4, 6)), ("text", 15), ("video", (3, 4, 4)), ("text", 280)],
        [("text", 12), ("image", (1, 4, 4)), ("text", 9), ("image", (1, 6, 8)), ("text", 200)],
    ],
}


def batch_inputs(seed, rows):
    """Left-padded batch: ids, mask, mm_token_type_ids, pixel values and grids (None where absent)."""
    rng = np.random.default_rng(seed)
    built = [build_prompt(rng, parts) for parts in rows]
    width = max(len(b[0]) for b in built)
    ids = np.zeros((len(rows), width), np.int64)
    types, mask = np.zeros_like(ids), np.zeros_like(ids)
    for r, (row_ids, row_types, _, _) in enumerate(built):
        ids[r, width - len(row_ids) :] = row_ids
        types[r, width - len(row_ids) :] = row_types
        mask[r, width - len(row_ids) :] = 1
    images = [g for b in built for g in b[2]]
    videos = [g for b in built for g in b[3]]

    def pixels(grids):
        if not grids:
            return None, None
        grids = np.array(grids)
        return rng.standard_normal((int(grids.prod(-1).sum()), PATCH_DIM)).astype(np.float32), grids

    pixel_values, image_grid_thw = pixels(images)
    pixel_values_videos, video_grid_thw = pixels(videos)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, pixel_values=pixel_values,
                image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                video_grid_thw=video_grid_thw)  # fmt: skip


def reference_vl_logits(reference, inputs):
    with torch.no_grad():
        tensors = {k: torch.from_numpy(v) for k, v in inputs.items() if v is not None}
        return reference(**tensors).logits.float().numpy()


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("name", VL_FAMILIES)
def test_vl_logits_match_reference(built_models, name, scenario):
    built = built_models(name)
    inputs = batch_inputs(seed=len(scenario), rows=SCENARIOS[scenario])
    ref = reference_vl_logits(built.reference, inputs)
    ours = np.asarray(built.model(**inputs))
    assert_logits_match(ours, ref, inputs["attention_mask"])


def test_placeholder_count_mismatch_is_a_clear_error(built_models):
    from qwen_jax.errors import InputError

    built = built_models("qwen3_vl")
    inputs = batch_inputs(seed=1, rows=SCENARIOS["one_image"])
    inputs["image_grid_thw"] = np.array([[1, 4, 8]])  # 8 merged tokens for 6 placeholders
    inputs["pixel_values"] = np.zeros((32, PATCH_DIM), np.float32)
    with pytest.raises(InputError, match="image placeholders and features differ: 6 tokens, 8 features"):
        built.model(**inputs)


@pytest.mark.parametrize("name", VL_FAMILIES)
def test_greedy_generation_with_images_equals_reference(built_models, name):
    from test_model_parity import RELATIVE_TOLERANCE

    import qwen_jax

    built = built_models(name)
    rows = [[("text", 30), ("image", (1, 4, 6)), ("text", 90)], [("text", 8), ("image", (1, 8, 4)), ("text", 20)]]
    # Seed 1: no near-tie in the reference's 40 steps for any row of the four families (all cut points 40).
    inputs = batch_inputs(seed=1, rows=rows)
    new = 40
    with torch.no_grad():
        tensors = {k: torch.from_numpy(v) for k, v in inputs.items() if v is not None}
        ref = built.reference.generate(**tensors, max_new_tokens=new, do_sample=False, pad_token_id=0,
                                       eos_token_id=None, output_scores=True, return_dict_in_generate=True)  # fmt: skip
    ref_tokens = ref.sequences[:, inputs["input_ids"].shape[1] :].numpy()
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    ours = qwen_jax.generate(built.model, ids, mask, max_new_tokens=new, pad_token_id=0, **inputs)
    scores = torch.stack(ref.scores, 1).float().numpy()
    top2 = np.sort(scores, axis=-1)[..., -2:]
    near_tie = (top2[..., 1] - top2[..., 0]) <= 10 * RELATIVE_TOLERANCE * np.abs(scores).max(-1)
    for row in range(2):
        cut = int(np.argmax(near_tie[row])) if near_tie[row].any() else new
        assert cut >= 30, f"row {row}: only {cut} comparable tokens"
        np.testing.assert_array_equal(ours[row, :cut], ref_tokens[row, :cut], err_msg=f"row {row}")
