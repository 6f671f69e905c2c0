"""Chat training with images: the whole path (JSONL-style conversations with image files -> preprocessing ->
placeholders -> packing beside the tokens -> the vision tower on a fixed-size batch of packed patches -> DeepStack /
MRoPE decoder -> loss) against the reference run on each conversation alone.

Two vision-language families (Qwen3-VL with DeepStack, Qwen3.5 with its own tower), one packed batch of three
conversations (two images of different sizes in one, one in another, one with none), rows of 160 tokens so that a
delta-net chunk boundary (64) falls inside a conversation. The reference gets each conversation's tokens, the same
pixel values and grids, and its labels (assistant tokens), computes its own MRoPE positions, and runs in float64.
Tolerances as in `test_train_gradients` (1e-4 x the largest reference gradient per tensor), now over the vision
tower's gradients as well, except `A_log` / `dt_bias` at 1e-3: their per-head gradients cancel even more here (the
largest is 6e-6 on Qwen3.5), and the reference's own float32 gradients are 3.0e-4 of the max
off its float64 ones on these conversations (measured), ours up to 5.3e-4. Losses 1e-5 relative.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import write_vl_tokenizer
from PIL import Image
from test_train_gradients import compare_grads, reference_grads_in_our_layout

from qwen_jax.chat import ChatTokenizer
from qwen_jax.errors import InputError
from qwen_jax.processing import ImageSettings, preprocess_images
from qwen_jax.train import data
from qwen_jax.train.images import ImageInputs
from qwen_jax.train.trainer import LossSettings, batch_objective

SEQ, PATCHES = 160, 128
SETTINGS = ImageSettings(min_pixels=32 * 32)  # small images stay small: a 96 x 64 picture is 6 x 4 patches
SIZES = {"tall.png": (96, 64), "wide.png": (64, 128), "square.png": (64, 64)}


def words(rng, n: int) -> str:
    return " ".join(f"w{i}" for i in rng.integers(8, 280, n))


def conversations(rng, folder) -> list[dict]:
    def image(name):
        return {"type": "image", "image": str(folder / name)}

    return [
        {"messages": [{"role": "user", "content": [image("tall.png"), {"type": "text", "text": words(rng, 40)}]},
                      {"role": "assistant", "content": words(rng, 30)},
                      {"role": "user", "content": [{"type": "text", "text": words(rng, 5)}, image("wide.png")]},
                      {"role": "assistant", "content": words(rng, 20)}], "source": "two images"},
        {"messages": [{"role": "user", "content": words(rng, 12)},
                      {"role": "assistant", "content": words(rng, 9)}], "source": "text"},
        {"messages": [{"role": "user", "content": [image("square.png")]},
                      {"role": "assistant", "content": words(rng, 15)}], "source": "one image"},
    ]  # fmt: skip


@functools.partial(jax.jit, static_argnames=("config", "settings"))
def objective_and_grads(params, config, batch, settings):
    normalizer = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    (objective, (ce_sum, _)), grads = jax.value_and_grad(batch_objective, has_aux=True)(
        params, config, batch, settings, normalizer, 1
    )
    return objective, ce_sum, grads


@pytest.mark.timeout(400)
@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5_vl"])
def test_image_conversations_train_like_the_reference(built_models, family, tmp_path):
    built = built_models(family)
    model = built.model
    write_vl_tokenizer(tmp_path)
    tokenizer = ChatTokenizer(tmp_path)
    rng = np.random.default_rng(7)
    for name, (h, w) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    docs = conversations(rng, tmp_path)
    images = ImageInputs(model.config.vision, model.config.image_token_id, SETTINGS, PATCHES)
    batches = data.packed_batches(docs, tokenizer, seq_len=SEQ, batch_size=2, shuffle=False, num_epochs=1,
                                  images=images)  # fmt: skip
    (batch,) = list(batches)
    assert sorted(np.unique(batch["segment_ids"]).tolist()) == [0, 1, 2] and batch["segment_ids"].max(1).sum() == 3
    assert int((batch["patch_frame"] > 0).sum()) == sum(h * w // 256 for h, w in SIZES.values())

    settings = LossSettings(vision=model.config.vision, image_token_id=model.config.image_token_id)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    objective, ce_sum, grads = objective_and_grads(model.params, model.config.text, batch, settings)

    reference = copy.deepcopy(built.reference).double()
    targets = float(np.sum(batch["loss_mask"]))
    total = 0.0
    for doc in docs:
        tokens = data.tokenize_document(tokenizer, doc, images)
        labels = np.where(tokens["mask"] == 1, tokens["tokens"], -100)
        kwargs = {}
        paths = data.image_paths(doc)
        if paths:
            pixels, grids = preprocess_images(paths, **SETTINGS.kwargs())
            types = (tokens["tokens"] == model.config.image_token_id).astype(np.int64)[None]  # the processor's
            kwargs = dict(pixel_values=torch.from_numpy(pixels).double(), image_grid_thw=torch.from_numpy(grids),
                          mm_token_type_ids=torch.from_numpy(types))  # fmt: skip
        out = reference(input_ids=torch.from_numpy(tokens["tokens"][None]).long(),
                        labels=torch.from_numpy(labels[None]).long(), **kwargs)  # fmt: skip
        count = int((labels[1:] != -100).sum())
        total += float(out.loss.detach()) * count
        (out.loss * count / targets).backward()
    assert abs(float(ce_sum) - total) <= 1e-5 * total, (float(ce_sum), total)
    assert abs(float(objective) - total / targets) <= 1e-5 * float(objective)
    reference_grads = reference_grads_in_our_layout(built, reference)
    assert np.abs(reference_grads["visual/patch_embed/kernel"]).max() > 0  # the tower is really trained
    compare_grads(grads, reference_grads, model.config.text, visual=True, cancelling_tolerance=1e-3)


def test_image_conversation_errors(built_models, tmp_path):
    model = built_models("qwen3_vl").model
    write_vl_tokenizer(tmp_path)
    tokenizer = ChatTokenizer(tmp_path)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "x.png")
    images = ImageInputs(model.config.vision, model.config.image_token_id, SETTINGS, 8)
    user = {"role": "user", "content": [{"type": "image"}]}
    doc = {"messages": [user, {"role": "assistant", "content": "w9"}], "images": [str(tmp_path / "x.png")],
           "source": "c.jsonl:3"}  # fmt: skip
    with pytest.raises(InputError, match="more than seq_len 160 or image_patches_per_row 8"):
        next(iter(data.packed_batches([doc], tokenizer, seq_len=SEQ, batch_size=1, images=images)))
    with pytest.raises(InputError, match="c.jsonl:3: more image parts than images"):
        data.image_paths(dict(doc, images=[]))
    with pytest.raises(InputError, match="c.jsonl:3: more images than image parts"):
        data.image_paths(dict(doc, images=["a", "b"]))
    with pytest.raises(InputError, match="videos are not supported"):
        data.image_paths(dict(doc, messages=[{"role": "user", "content": [{"type": "video"}]}]))
    with pytest.raises(InputError, match="must be a positive multiple of 4"):
        ImageInputs(model.config.vision, model.config.image_token_id, SETTINGS, 6)
    with pytest.raises(InputError, match="differ from the vision tower's"):
        ImageInputs(model.config.vision, model.config.image_token_id, ImageSettings(patch_size=14), 8)


@pytest.mark.timeout(400)
def test_fine_tune_on_image_conversations_from_jsonl(built_models, tmp_path):
    """The recipe path: a converted vision-language checkpoint fine-tuned on a JSONL file of conversations with
    images (paths relative to the file), processor settings read from the checkpoint, held-out conversations with
    images scored; the vision tower trains and the saved model has it."""
    import json
    import shutil

    import qwen_jax
    from qwen_jax.train import make_recipe, train

    init = tmp_path / "init"
    shutil.copytree(built_models("qwen3_vl").converted_dir, init)
    write_vl_tokenizer(init)
    (init / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 32 * 32,
                                                    "longest_edge": 128 * 128}, "patch_size": 16}))  # fmt: skip
    rng = np.random.default_rng(3)
    (tmp_path / "pictures").mkdir()
    lines = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32 * (1 + i % 3), 64, 3), dtype=np.uint8)).save(
            tmp_path / "pictures" / f"{i}.png"
        )
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words(rng, 6)}]},
                    {"role": "assistant", "content": f"w{10 + i % 3} w20"}]  # fmt: skip
        lines.append(json.dumps({"messages": messages, "images": [f"pictures/{i}.png"]}))
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    recipe = make_recipe({"init": str(init), "data": [str(tmp_path / "chat.jsonl")], "seq_len": 64, "batch_size": 2,
                          "steps": 4, "warmup_steps": 1, "learning_rate": 3e-3, "held_out_fraction": 0.25,
                          "image_patches_per_row": 64, "run_dir": str(tmp_path / "run"),
                          "output": str(tmp_path / "out")})  # fmt: skip
    result = train(recipe, progress=False, log=lambda _: None)
    assert len(result.metrics) == 4 and all(np.isfinite(m["loss"]) and m["tokens"] > 0 for m in result.metrics)
    assert result.held_out_tokens > 0 and np.isfinite(result.held_out_loss)
    before, after = qwen_jax.load(init).params["visual"], qwen_jax.load(result.output).params["visual"]
    moved = [float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
             for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]  # fmt: skip
    assert min(moved) > 0, moved
    assert (result.output / "preprocessor_config.json").read_text() == (init / "preprocessor_config.json").read_text()
