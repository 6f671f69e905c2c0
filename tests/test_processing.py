"""Image / video preprocessing and prompt expansion equal `transformers` 5.23's Qwen-VL processors.

torchvision cannot be imported beside the pinned CPU torch, so `AutoImageProcessor` here resolves to
`Qwen2VLImageProcessorPil`: the `"pil"` backend is compared with it end to end. The torchvision-backed classes
(`Qwen2VLImageProcessor`, `Qwen3VLVideoProcessor`) are rebuilt from their importable pieces: the reference
`smart_resize`, `sample_frames`, `patchify` and `_calculate_timestamps` functions called as they are, plus the two
torch calls torchvision makes for them on CPU: `torch.nn.functional.interpolate(uint8, bicubic, antialias=True)`
(torchvision's `resize_image` for a uint8 tensor with bicubic; it returns the input when the size is unchanged) and
`(x - mean * 255) / (std * 255)` in float32 (`rescale_and_normalize` -> `tvF.normalize`, i.e. `sub_` then `div_`).

Every pixel comparison is exact (`array_equal`, tolerance 0): both backends resize in uint8 with integer arithmetic
that is reproduced exactly (PIL itself, or torch's int16 fixed-point kernel), and the float steps are the same IEEE
operations in the same order and dtype.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types
import typing
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as ref_image
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.video_utils import VideoMetadata

from qwen_jax.errors import InputError
from qwen_jax.processing import (
    ImageSettings,
    ProcessorConfig,
    VideoSettings,
    VisionTokens,
    expand_vision_placeholders,
    frame_timestamps,
    load_image,
    load_video,
    mm_token_type_ids,
    preprocess_images,
    preprocess_video,
    sample_frame_indices,
    smart_resize,
    smart_resize_video,
)

# Imported by module path: through the package's lazy loader it would demand torchvision.
ref_video = importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")

QWEN3_IMAGE = {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16, "temporal_patch_size": 2,
               "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}  # fmt: skip
QWEN3_VIDEO = {"size": {"shortest_edge": 4096, "longest_edge": 25165824}, "patch_size": 16, "temporal_patch_size": 2,
               "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "fps": 2,
               "min_frames": 4, "max_frames": 768}  # fmt: skip


def picture(height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """A smooth gradient plus noise: overshooting bicubic lobes and clamping both get exercised."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    planes = [x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256, (x * y) % 256]
    base = np.stack(planes[:channels], -1)  # the 4th plane: an alpha with opaque, clear and partial pixels
    noisy = base + rng.normal(0, 40, (height, width, channels)) * (rng.random((height, width, 1)) < 0.3)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def reference_images(images, **settings):
    reference = ref_image.Qwen2VLImageProcessorPil(**settings)
    out = reference(images=images, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def test_auto_image_processor_resolves_to_the_pil_class_here():
    # What "the reference" is in this environment: without torchvision, the PIL backend.
    assert transformers.Qwen2VLImageProcessor is ref_image.Qwen2VLImageProcessorPil


# ---------------------------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("factor,bounds", [(32, (65536, 16777216)), (28, (3136, 1003520)), (32, (4096, 262144))])
def test_smart_resize_equals_reference(factor, bounds):
    rng = np.random.default_rng(factor)
    sizes = [(20, 30), (1, 1), (3000, 2000), (4096, 4096), (5000, 30), (33, 6000), (224, 224), (17, 3000)]
    sizes += [tuple(int(v) for v in rng.integers(1, 8000, 2)) for _ in range(300)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        assert smart_resize(h, w, factor, *bounds) == ref_image.smart_resize(h, w, factor, *bounds), (h, w)


def test_smart_resize_video_equals_reference():
    rng = np.random.default_rng(1)
    cases = [(4, 20, 30), (2, 1, 40), (768, 1080, 1920), (5, 16, 16), (3, 31, 500), (100, 4000, 3000)]
    cases += [(int(rng.integers(2, 800)), *(int(v) for v in rng.integers(4, 4000, 2))) for _ in range(300)]
    for t, h, w in cases:
        if max(h, w) / min(h, w) > 150:
            continue
        for bounds in ((4096, 25165824), (131072, 786432)):
            expected = ref_video.smart_resize(t, h, w, temporal_factor=2, factor=32, min_pixels=bounds[0],
                                              max_pixels=bounds[1])  # fmt: skip
            assert smart_resize_video(t, h, w, 2, 32, *bounds) == expected, (t, h, w)


def test_extreme_aspect_ratio_is_an_input_error():
    with pytest.raises(ValueError, match="aspect ratio"):
        ref_image.smart_resize(10, 2500, 32)  # the reference refuses it too
    with pytest.raises(InputError, match="aspect ratio 250 .* over the limit of 200"):
        smart_resize(10, 2500, 32)
    with pytest.raises(InputError, match="aspect ratio"):
        preprocess_images([np.zeros((4, 1000, 3), np.uint8)])


# --------------------------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "sizes,settings",
    [
        # tiny (scaled up to min_pixels), odd, near the aspect limit, square
        ([(20, 30), (300, 200), (1001, 333), (17, 3000), (64, 64)], QWEN3_IMAGE),
        # very large images clamped by max_pixels (a lower bound than a checkpoint's, to keep the test quick)
        ([(3000, 2000), (2000, 3001)], dict(QWEN3_IMAGE, size={"shortest_edge": 65536, "longest_edge": 1 << 20})),
        # the class defaults (Qwen2-VL: patch 14, CLIP mean / std), so the per-channel normalization is non-trivial
        ([(123, 456), (50, 50)], {}),
    ],
)
def test_images_equal_reference_processor(sizes, settings, tmp_path):
    arrays = [picture(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    expected_pixels, expected_grid = reference_images([PIL.Image.fromarray(a) for a in arrays], **settings)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))  # {}: the reference class's defaults
    kwargs = ProcessorConfig.from_dir(tmp_path).image.kwargs()
    for inputs in ([PIL.Image.fromarray(a) for a in arrays], arrays):  # PIL images and uint8 arrays
        pixels, grid = preprocess_images(inputs, **kwargs)
        assert pixels.dtype == np.float32 and grid.dtype == np.int64
        np.testing.assert_array_equal(grid, expected_grid)
        np.testing.assert_array_equal(pixels, expected_pixels)  # exact: same PIL resize, same float ops
    if settings.get("size", {}).get("longest_edge") == 1 << 20:
        assert all(t * h * w * 16 * 16 <= 1 << 20 for t, h, w in grid)  # really clamped


def test_grayscale_and_transparent_images_equal_reference():
    rng = np.random.default_rng(3)
    rgba = PIL.Image.fromarray(picture(50, 70, channels=4), "RGBA")
    gray = PIL.Image.fromarray(picture(90, 40)[..., 0], "L")
    gray_alpha = PIL.Image.fromarray(picture(33, 77)[..., :2], "LA")
    palette = PIL.Image.fromarray(picture(40, 60)).convert("P")
    palette.info["transparency"] = 0
    images = [rgba, gray, gray_alpha, palette, rng.integers(0, 256, (45, 80, 4), np.uint8)]
    expected_pixels, expected_grid = reference_images(images, **QWEN3_IMAGE)
    pixels, grid = preprocess_images(images)
    np.testing.assert_array_equal(grid, expected_grid)
    np.testing.assert_array_equal(pixels, expected_pixels)
    # A [H, W] array (which the reference rejects) is taken as the grayscale picture it is.
    gray_array = np.asarray(gray)
    np.testing.assert_array_equal(preprocess_images(gray_array)[0], preprocess_images([gray])[0])


def test_patch_layout_is_block_major_with_the_image_repeated_in_time():
    image = picture(64, 96)
    pixels, grid = preprocess_images([image], min_pixels=64 * 96, max_pixels=64 * 96)
    assert grid.tolist() == [[1, 4, 6]]
    plane = (image.astype(np.float64) / 255).astype(np.float32)
    plane = (plane - np.float32(0.5)) / np.float32(0.5)
    patches = pixels.reshape(2, 3, 2, 2, 3, 2, 16, 16)  # (h/2, w/2, 2, 2, C, T, P, P)
    for bh, bw, mh, mw in np.ndindex(2, 3, 2, 2):
        row, col = (2 * bh + mh) * 16, (2 * bw + mw) * 16
        block = plane[row : row + 16, col : col + 16].transpose(2, 0, 1)
        for t in range(2):
            np.testing.assert_array_equal(patches[bh, bw, mh, mw, :, t], block)


def test_torchvision_backend_resize_equals_torch_kernel():
    from qwen_jax.processing import _resize

    rng = np.random.default_rng(5)
    pairs = [((100, 37), (64, 32)), ((480, 640), (224, 320)), ((20, 30), (64, 96)), ((1080, 1920), (704, 1248)),
             ((7, 300), (32, 1024)), ((256, 256), (256, 128))]  # fmt: skip
    pairs += [(tuple(int(v) for v in rng.integers(5, 400, 2)), tuple(int(v) for v in rng.integers(8, 500, 2)))
              for _ in range(20)]  # fmt: skip
    for (h, w), (nh, nw) in pairs:
        frames = np.stack([picture(h, w, seed=1), rng.integers(0, 256, (h, w, 3), np.uint8)])
        tensor = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
        expected = torch.nn.functional.interpolate(tensor, size=(nh, nw), mode="bicubic", antialias=True,
                                                   align_corners=False).permute(0, 2, 3, 1).numpy()  # fmt: skip
        np.testing.assert_array_equal(_resize(frames, nh, nw, "torchvision"), expected, err_msg=f"{(h, w, nh, nw)}")


def torchvision_reference_pixels(frames: np.ndarray, height: int, width: int, mean, std) -> torch.Tensor:
    """float32 `[N, C, height, width]`: `TorchvisionBackend.resize` + `rescale_and_normalize` on CPU."""
    tensor = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    if tensor.shape[-2:] != (height, width):
        tensor = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bicubic", antialias=True,
                                                 align_corners=False)  # fmt: skip
    mean = (torch.tensor(mean) * (1.0 / (1 / 255)))[:, None, None]
    std = (torch.tensor(std) * (1.0 / (1 / 255)))[:, None, None]
    return tensor.to(torch.float32).sub_(mean).div_(std)


def test_torchvision_backend_images_equal_reference_pieces():
    for h, w in [(20, 30), (300, 200), (1001, 333)]:
        image = picture(h, w, seed=h)
        pixels, grid = preprocess_images([image], backend="torchvision")
        rh, rw = ref_image.smart_resize(h, w, 32, 65536, 16777216)
        normalized = torchvision_reference_pixels(image[None], rh, rw, [0.5] * 3, [0.5] * 3)[0].numpy()
        expected, gh, gw = ref_image.Qwen2VLImageProcessorPil.patchify(None, normalized, 16, 2, 2)
        assert grid.tolist() == [[1, gh, gw]]
        np.testing.assert_array_equal(pixels, expected)


# --------------------------------------------------------------------------------------------------------------- videos


def reference_sample(total: int, fps: float, target: float = 2, min_frames: int = 4, max_frames: int = 768):
    self = types.SimpleNamespace(fps=target, min_frames=min_frames, max_frames=max_frames)
    return ref_video.Qwen3VLVideoProcessor.sample_frames(self, VideoMetadata(total_num_frames=total, fps=fps))


def test_frame_sampling_equals_reference():
    rng = np.random.default_rng(7)
    cases = [(1, 30.0), (3, 30.0), (12, 4.0), (300, 29.97), (100000, 60.0), (50, 2.0), (7, 0.5), (97, 24.0)]
    cases += [
        (int(rng.integers(1, 5000)), float(rng.choice([1, 5, 12.5, 23.976, 24, 25, 30, 59.94]))) for _ in range(200)
    ]
    for total, fps in cases:
        for target, lo, hi in ((2, 4, 768), (1, 2, 16), (4.5, 8, 100)):
            indices = sample_frame_indices(total, fps, target, lo, hi)
            np.testing.assert_array_equal(indices, reference_sample(total, fps, target, lo, hi))
            # the documented rule: the target rate, clamped to [min, max] frames and to the video, spanning it all
            assert len(indices) == min(max(int(total / fps * target), lo), hi, total)
            assert indices[0] == 0 and indices[-1] == total - 1 and np.all(np.diff(indices) >= 0)


def test_timestamps_equal_reference_and_are_patch_means():
    for indices, fps in [
        ([0, 2, 4, 6, 8, 10, 12], 4.0),
        (list(range(0, 300, 15)), 29.97),
        ([0, 5, 9], 2.0),
        ([3], 1.0),
    ]:
        for merge in (1, 2, 4):
            ours = frame_timestamps(np.array(indices), fps, merge)
            assert ours == Qwen3VLProcessor._calculate_timestamps(None, np.array(indices), fps, merge)
            padded = indices + [indices[-1]] * (-len(indices) % merge)
            groups = np.array(padded).reshape(-1, merge) / fps
            np.testing.assert_allclose(ours, (groups[:, 0] + groups[:, -1]) / 2, rtol=0, atol=0)
            if merge == 2:  # T=2: the first/last mean is the mean time of the patch's frames
                np.testing.assert_allclose(ours, groups.mean(axis=1), rtol=1e-15)


def reference_video(frames: np.ndarray, fps: float, settings: dict = QWEN3_VIDEO):
    """`Qwen3VLVideoProcessor` (torchvision, CPU) + `Qwen3VLProcessor`'s timestamps, from the reference's pieces."""
    indices = reference_sample(len(frames), fps, settings["fps"], settings["min_frames"], settings["max_frames"])
    clip = frames[indices]
    factor = settings["patch_size"] * settings["merge_size"]
    size = settings["size"]
    height, width = ref_video.smart_resize(len(clip), clip.shape[1], clip.shape[2], settings["temporal_patch_size"],
                                           factor, size["shortest_edge"], size["longest_edge"])  # fmt: skip
    pixels = torchvision_reference_pixels(clip, height, width, settings["image_mean"], settings["image_std"])
    patches, t, h, w = ref_video.Qwen3VLVideoProcessor.patchify(
        None, pixels[None], settings["patch_size"], settings["merge_size"], settings["temporal_patch_size"]
    )
    times = Qwen3VLProcessor._calculate_timestamps(None, indices, fps, settings["temporal_patch_size"])
    return patches[0].numpy(), [[t, h, w]], times


@pytest.mark.parametrize("count,fps,height,width", [(37, 7.5, 90, 160), (12, 4.0, 48, 64), (9, 30.0, 20, 30),
                                                    (50, 2.0, 200, 120)])  # fmt: skip
def test_video_equals_reference_pieces(count, fps, height, width):
    frames = np.stack([picture(height, width, seed=i) for i in range(count)])
    expected_pixels, expected_grid, expected_times = reference_video(frames, fps)
    pixels, grid, times = preprocess_video(frames, fps, **ProcessorConfig().video.kwargs())
    np.testing.assert_array_equal(grid, expected_grid)
    assert times == expected_times
    np.testing.assert_array_equal(pixels, expected_pixels)


def test_video_pil_backend_equals_image_processor_per_frame():
    frames = np.stack([picture(90, 160, seed=i) for i in range(7)])  # 7 sampled frames: the last is repeated
    pixels, grid, _ = preprocess_video(frames, 2.0, backend="pil")
    t, h, w = grid[0]
    assert t == 4
    reference = ref_image.Qwen2VLImageProcessorPil(**QWEN3_IMAGE)
    size = transformers.image_utils.SizeDict(height=int(h) * 16, width=int(w) * 16)
    planes = []
    for frame in frames:  # all 7 kept (3.5 s at 2 fps)
        chw = np.moveaxis(frame, -1, 0)
        resized = ref_image.PilBackend.resize(reference, chw, size, resample=PIL.Image.BICUBIC)
        planes.append(reference.normalize(reference.rescale(resized, 1 / 255), [0.5] * 3, [0.5] * 3))
    planes.append(planes[-1])
    clip = torch.from_numpy(np.stack(planes))[None]
    expected, *_ = ref_video.Qwen3VLVideoProcessor.patchify(None, clip, 16, 2, 2)
    np.testing.assert_array_equal(pixels, expected[0].numpy())


def test_one_frame_video_is_an_input_error():
    with pytest.raises(InputError, match="at least 2 sampled frames, got 1"):
        preprocess_video(np.zeros((1, 64, 64, 3), np.uint8), 30.0)


# ------------------------------------------------------------------------------------------------------ reading files


def write_video(path: Path, frames: np.ndarray, fps: int, codec: str, pix_fmt: str) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_load_video_file(tmp_path):
    frames = np.stack([picture(48, 64, seed=i) for i in range(12)])
    write_video(tmp_path / "clip.mkv", frames, 4, "ffv1", "bgr0")  # lossless: the frames come back exactly
    decoded, fps = load_video(tmp_path / "clip.mkv")
    assert decoded.shape == (12, 48, 64, 3) and decoded.dtype == np.uint8 and fps == 4.0
    np.testing.assert_array_equal(decoded, frames)
    write_video(tmp_path / "clip.mp4", frames, 4, "mpeg4", "yuv420p")  # a common lossy container
    decoded, fps = load_video(str(tmp_path / "clip.mp4"))
    assert decoded.shape == (12, 48, 64, 3) and fps == 4.0
    assert np.abs(decoded.astype(int) - frames).mean() < 20  # lossy, but the same pictures


def test_load_video_folder(tmp_path):
    frames = [picture(30, 40, seed=i) for i in range(5)]
    for i, frame in enumerate(frames):  # names sort as 0, 1, ..., not by creation order
        PIL.Image.fromarray(frame).save(tmp_path / f"frame_{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    decoded, fps = load_video(tmp_path)
    assert fps == 2.0
    np.testing.assert_array_equal(decoded, np.stack(frames))
    assert load_video(tmp_path, fps=12.5)[1] == 12.5


def test_load_image_matches_reference_loader(tmp_path):
    rgba = PIL.Image.fromarray(picture(20, 30, channels=4), "RGBA")
    rgba.save(tmp_path / "a.png")
    expected = np.asarray(transformers.image_utils.load_image(str(tmp_path / "a.png")))
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), expected)
    np.testing.assert_array_equal(load_image(rgba), np.asarray(transformers.image_utils.load_image(rgba)))
    rotated = PIL.Image.fromarray(picture(20, 30))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90
    rotated.save(tmp_path / "r.jpg", exif=exif)
    loaded = load_image(str(tmp_path / "r.jpg"))
    assert loaded.shape == (30, 20, 3)
    np.testing.assert_array_equal(loaded, np.asarray(transformers.image_utils.load_image(str(tmp_path / "r.jpg"))))


# ----------------------------------------------------------------------------------------------------------- errors


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_unreadable_image_is_an_input_error(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(InputError) as error:
        load_image(corrupt)
    assert str(corrupt) in one_line(error)
    truncated = tmp_path / "truncated.jpg"
    PIL.Image.fromarray(picture(64, 64)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(InputError) as error:
        preprocess_images([str(truncated)])
    assert str(truncated) in one_line(error)
    with pytest.raises(InputError) as error:
        load_image(tmp_path / "missing.png")
    assert "missing.png" in one_line(error)


def test_empty_or_unreadable_video_is_an_input_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as error:
        load_video(tmp_path / "empty")
    assert "no image frames" in one_line(error) and "empty" in str(error.value)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("hi")
    with pytest.raises(InputError, match="no image frames"):
        load_video(tmp_path / "text")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    with pytest.raises(InputError) as error:
        load_video(broken)
    assert str(broken) in one_line(error)
    with pytest.raises(InputError, match="no frames"):
        preprocess_video(np.zeros((0, 8, 8, 3), np.uint8), 2.0)
    with pytest.raises(InputError, match="no frames"):
        sample_frame_indices(0, 30.0)


# ------------------------------------------------------------------------------------------------------ prompt text

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]  # fmt: skip


@pytest.fixture(scope="module")
def reference_processor():
    """`Qwen3VLProcessor` with a word-level tokenizer and a stand-in video processor (the real one needs torchvision)
    that returns our video outputs and metadata; the text expansion and token types are the reference's own code."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "describe", "and", "compare", "seconds", "<", ">"] + [f"{i / 10:.1f}" for i in range(400)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    tok.add_special_tokens(SPECIALS)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)

    class StandInVideoProcessor:
        merge_size, temporal_patch_size = 2, 2
        outputs: typing.ClassVar[list] = []

        def __call__(self, videos, **kwargs):
            grids = [grid[0] for grid, _ in self.outputs]
            metadata = [
                VideoMetadata(total_num_frames=n, fps=fps, frames_indices=idx) for _, (n, fps, idx) in self.outputs
            ]
            return {"video_grid_thw": np.array(grids), "video_metadata": metadata}

    class Recording(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, name, argument):  # the stand-in is no BaseVideoProcessor
            return type(argument)

        def get_text_with_replacements(self, text, *args, **kwargs):
            text, offsets = super().get_text_with_replacements(text, *args, **kwargs)
            self.expanded = list(text)
            return text, offsets

    image_processor = ref_image.Qwen2VLImageProcessorPil(**QWEN3_IMAGE)
    return Recording(image_processor=image_processor, tokenizer=tokenizer, video_processor=StandInVideoProcessor())


def test_expansion_and_token_types_equal_reference_processor(reference_processor):
    processor = reference_processor
    images = [PIL.Image.fromarray(picture(300, 200)), PIL.Image.fromarray(picture(40, 90, seed=1))]
    clips = [
        np.stack([picture(48, 64, seed=i) for i in range(13)]),
        np.stack([picture(70, 30, seed=i) for i in range(30)]),
    ]
    video_fps = [4.0, 7.5]
    videos = [preprocess_video(c, f) for c, f in zip(clips, video_fps)]
    processor.video_processor.outputs = [
        (grid, (len(c), f, sample_frame_indices(len(c), f))) for (_, grid, _), c, f in zip(videos, clips, video_fps)
    ]
    text = [
        "<|im_start|> describe <|vision_start|><|image_pad|><|vision_end|> and "
        + "<|vision_start|><|video_pad|><|vision_end|> <|im_end|>",
        "compare <|vision_start|><|video_pad|><|vision_end|> <|vision_start|><|image_pad|><|vision_end|>",
    ]
    reference = processor(images=images, text=text, videos=clips, return_tensors=None)

    pixels, image_grid = preprocess_images(images)
    np.testing.assert_array_equal(pixels, reference["pixel_values"])
    ours = expand_vision_placeholders(text, image_grid, np.concatenate([g for _, g, _ in videos]),
                                      [t for *_, t in videos], merge_size=2)  # fmt: skip
    assert ours == processor.expanded
    assert "<|vision_start|><0.2 seconds><|vision_start|>" in ours[0]  # the reference keeps the template's pair
    tokenizer = processor.tokenizer
    for sample, expected_ids, expected_types in zip(ours, reference["input_ids"], reference["mm_token_type_ids"]):
        ids = tokenizer(sample)["input_ids"]
        assert ids == expected_ids
        types = mm_token_type_ids(np.array(ids), processor.image_token_id, processor.video_token_id)
        assert types.tolist() == expected_types
    assert expand_vision_placeholders(text[0], image_grid[:1], videos[0][1], [videos[0][2]]) == ours[0]


def test_expansion_without_the_outer_markers_is_the_original_layout():
    grid, times = np.array([[3, 4, 6]]), [[0.25, 1.25, 2.25]]
    text = "a <|vision_start|><|video_pad|><|vision_end|> b"
    frame = "<|vision_start|>" + "<|video_pad|>" * 6 + "<|vision_end|>"
    expected = "a " + "".join(f"<{t:.1f} seconds>" + frame for t in (0.2, 1.2, 2.2)) + " b"  # .1f rounds half to even
    assert expand_vision_placeholders(text, None, grid, times, keep_outer_markers=False) == expected
    kept = expand_vision_placeholders(text, None, grid, times)
    assert kept == expected.replace("a <", "a <|vision_start|><", 1).replace(" b", "<|vision_end|> b")


def test_placeholder_count_mismatch_is_an_input_error():
    grid = np.array([[1, 4, 4]])
    with pytest.raises(InputError) as error:
        expand_vision_placeholders("<|image_pad|> <|image_pad|>", grid)
    assert "2 image placeholders" in one_line(error) and "1 images" in str(error.value)
    with pytest.raises(InputError, match="0 image placeholders .* 1 images"):
        expand_vision_placeholders("no pictures here", grid)
    with pytest.raises(InputError, match="1 video placeholders .* 0 videos"):
        expand_vision_placeholders("<|video_pad|>", grid[:0])
    with pytest.raises(InputError, match="needs 2 timestamps, got 1"):
        expand_vision_placeholders("<|video_pad|>", None, np.array([[2, 4, 4]]), [[0.5]])
    custom = VisionTokens(image="<img>")
    assert expand_vision_placeholders("<img>", grid, tokens=custom) == "<img>" * 4


# ------------------------------------------------------------------------------------------------------------ configs


def test_processor_config_reads_checkpoint_files(tmp_path):
    assert ProcessorConfig.from_dir(tmp_path) == ProcessorConfig()  # no files: the Qwen3-VL / Qwen3.5 values
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN3_IMAGE))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(dict(QWEN3_VIDEO, fps=1, max_frames=64)))
    config = ProcessorConfig.from_dir(tmp_path)
    assert config.image == ImageSettings()
    assert config.video == VideoSettings(target_fps=1.0, max_frames=64)
    # A file that leaves keys out gets the reference class defaults for them, as from_pretrained builds the class.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16}))
    reference = ref_image.Qwen2VLImageProcessorPil(patch_size=16)
    image = ProcessorConfig.from_dir(tmp_path).image
    assert (image.min_pixels, image.max_pixels) == (reference.size.shortest_edge, reference.size.longest_edge)
    assert image.image_mean == tuple(reference.image_mean) and image.patch_size == 16
    # processor_config.json with one entry per modality takes precedence.
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": QWEN3_IMAGE,
                                                                "video_processor": QWEN3_VIDEO}))  # fmt: skip
    assert ProcessorConfig.from_dir(tmp_path) == ProcessorConfig()
    (tmp_path / "processor_config.json").write_text("{not json")
    with pytest.raises(InputError, match="processor_config.json"):
        ProcessorConfig.from_dir(tmp_path)


def test_module_imports_no_framework():
    code = (
        "import sys, qwen_jax.processing; "
        "bad = [m for m in ('jax', 'torch', 'transformers', 'av') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
