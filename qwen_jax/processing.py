"""Turning images and videos into model inputs exactly as the reference (`transformers` 5.23) processors do.

Images follow `Qwen2VLImageProcessor` (the image processor of every Qwen3-VL / Qwen3.5 checkpoint), videos follow
`Qwen3VLVideoProcessor`, and prompt text follows `Qwen3VLProcessor.__call__`:

- `smart_resize` / `smart_resize_video`: the target size, a multiple of `patch_size * merge_size` on each side with
  the pixel count inside `[min_pixels, max_pixels]`;
- `load_image`, `preprocess_images`: RGB uint8 pictures -> `pixel_values [patches, C*T*P*P]`, `image_grid_thw [n, 3]`;
- `sample_frame_indices`, `frame_timestamps`, `load_video`, `preprocess_video`: frames -> `pixel_values_videos`,
  `video_grid_thw [1, 3]` and one timestamp per temporal patch;
- `expand_vision_placeholders`, `mm_token_type_ids`: the prompt's placeholders grown to one token per merged patch.

Two resampling backends, because the reference has two (`backend=`):

- `"pil"`: `Qwen2VLImageProcessorPil`, which `AutoImageProcessor` picks when torchvision is not installed: PIL bicubic
  resize, then `x.astype(float64) * rescale_factor` cast to float32, then `(x - mean) / std` in float32.
- `"torchvision"`: `Qwen2VLImageProcessor` / `Qwen3VLVideoProcessor` on CPU, picked when torchvision is installed:
  torch's uint8 antialiased bicubic resize (int16 fixed-point weights, width pass then height pass), then the fused
  `(x - mean / rescale_factor) / (std / rescale_factor)` in float32. This is the only backend of the reference video
  processor, so it is the video default. The two backends differ by about one uint8 step on some pixels.

Pixel patches are laid out block-major, as the vision tower expects: for each temporal patch `t`, each 2x2 block of
patches (`h / merge`, `w / merge`), each patch in the block (`merge`, `merge`), the flattened `(C, T, P, P)` values.

Only numpy and PIL are used (PyAV, for video files, is imported when a video file is read).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

from qwen_jax.errors import InputError

__all__ = [
    "ImageSettings",
    "ProcessorConfig",
    "VideoSettings",
    "VisionTokens",
    "expand_vision_placeholders",
    "frame_timestamps",
    "load_image",
    "load_video",
    "mm_token_type_ids",
    "preprocess_images",
    "preprocess_video",
    "sample_frame_indices",
    "smart_resize",
    "smart_resize_video",
]

BACKENDS = ("pil", "torchvision")
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the `resample` of every Qwen-VL processor config

# ------------------------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """Image processor settings; the defaults are what every Qwen3-VL / Qwen3.5 checkpoint's
    `preprocessor_config.json` holds. `preprocess_images(images, **settings.kwargs())`."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 256 * 256  # size["shortest_edge"]
    max_pixels: int = 4096 * 4096  # size["longest_edge"]
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    def kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments of `preprocess_images` / `preprocess_video`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class VideoSettings(ImageSettings):
    """Video processor settings; the defaults are what every Qwen3-VL / Qwen3.5 checkpoint's
    `video_preprocessor_config.json` holds. `preprocess_video(frames, fps, **settings.kwargs())`.

    `min_pixels` / `max_pixels` bound the whole clip (frames x height x width), not one frame."""

    min_pixels: int = 4096
    max_pixels: int = 25165824
    target_fps: float = 2.0  # "fps" in the config
    min_frames: int = 4
    max_frames: int = 768
    sample: bool = True  # "do_sample_frames"


# What the reference classes fall back to for a key that a config file leaves out (class attributes of
# `Qwen2VLImageProcessor` and `Qwen3VLVideoProcessor`; the image ones are Qwen2-VL's values).
_IMAGE_CLASS_DEFAULTS = ImageSettings(
    patch_size=14, min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
    image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711),
)  # fmt: skip
_VIDEO_CLASS_DEFAULTS = VideoSettings(min_pixels=128 * 32 * 32, max_pixels=32 * 32 * 768)


def _settings_from_dict(raw: dict, base: ImageSettings, source: Path) -> ImageSettings:
    updates: dict[str, Any] = {}
    size = raw.get("size") or {}
    if not isinstance(size, dict):
        raise InputError(f"{source}: 'size' must be an object with shortest_edge / longest_edge, got {size!r}")
    if "shortest_edge" in size:
        updates["min_pixels"] = int(size["shortest_edge"])
    if "longest_edge" in size:
        updates["max_pixels"] = int(size["longest_edge"])
    # Qwen2-VL-era image configs: top-level min_pixels / max_pixels override `size`, as the image processor's
    # __init__ does (the video processor ignores them).
    for key in ("min_pixels", "max_pixels"):
        if raw.get(key) is not None and not isinstance(base, VideoSettings):
            updates[key] = int(raw[key])
    for key in ("patch_size", "temporal_patch_size", "merge_size", "min_frames", "max_frames"):
        if key in raw and hasattr(base, key):
            updates[key] = int(raw[key])
    for key in ("image_mean", "image_std"):
        if key in raw:
            value = raw[key]
            updates[key] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
    if "rescale_factor" in raw:
        updates["rescale_factor"] = float(raw["rescale_factor"])
    if raw.get("fps") is not None and isinstance(base, VideoSettings):
        updates["target_fps"] = float(raw["fps"])
    if "do_sample_frames" in raw and isinstance(base, VideoSettings):
        updates["sample"] = bool(raw["do_sample_frames"])
    for key, expected in (("do_resize", True), ("do_rescale", True), ("do_normalize", True)):
        if raw.get(key, expected) is not expected:
            raise InputError(f"{source}: {key}={raw[key]} is not supported (Qwen-VL checkpoints use {expected})")
    if raw.get("resample", _BICUBIC) != _BICUBIC:
        raise InputError(f"{source}: resample={raw['resample']} is not supported (only 3, bicubic)")
    return dataclasses.replace(base, **updates)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
    """The image and video processor settings of a checkpoint."""

    image: ImageSettings = ImageSettings()
    video: VideoSettings = VideoSettings()

    @classmethod
    def from_dir(cls, directory: str | Path) -> ProcessorConfig:
        """Read `processor_config.json` ("image_processor" / "video_processor" entries), else
        `preprocessor_config.json` (images, and videos when there is no `video_preprocessor_config.json`) and
        `video_preprocessor_config.json`, where present, as `from_pretrained` does. A file that exists but leaves a key
        out gets the reference class's default for it (for images those are Qwen2-VL's: patch 14, CLIP mean/std);
        with no file at all, the Qwen3-VL / Qwen3.5 checkpoint values (this class's defaults) are used."""
        directory = Path(directory)
        combined = _read_json(directory / "processor_config.json") or {}
        image_file, video_file = directory / "preprocessor_config.json", directory / "video_preprocessor_config.json"
        image_raw = combined.get("image_processor")
        image_source = directory / "processor_config.json"
        if image_raw is None:
            image_raw, image_source = _read_json(image_file), image_file
        video_raw = combined.get("video_processor")
        video_source = directory / "processor_config.json"
        if video_raw is None:
            video_raw, video_source = _read_json(video_file), video_file
        if video_raw is None:
            video_raw, video_source = _read_json(image_file), image_file
        image = (
            ImageSettings()
            if image_raw is None
            else _settings_from_dict(image_raw, _IMAGE_CLASS_DEFAULTS, image_source)
        )
        video = (
            VideoSettings()
            if video_raw is None
            else _settings_from_dict(video_raw, _VIDEO_CLASS_DEFAULTS, video_source)
        )
        return cls(image=image, video=video)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------------------
# Target sizes
# ------------------------------------------------------------------------------------------------------------------


def _check_positive(height: float, width: float) -> None:
    if height <= 0 or width <= 0:
        raise InputError(f"image size must be positive, got {height}x{width}")


def _check_aspect(height: float, width: float) -> None:
    _check_positive(height, width)
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise InputError(f"aspect ratio {ratio:g} of a {height}x{width} image is over the limit of 200")


def smart_resize(
    height: int, width: int, factor: int = 32, min_pixels: int = 256 * 256, max_pixels: int = 4096 * 4096
) -> tuple[int, int]:
    """(h, w): the size an image of `height x width` is resized to: both multiples of `factor`
    (`patch_size * merge_size`), the aspect ratio kept as closely as possible, and `h * w` within
    `[min_pixels, max_pixels]`. Sides are rounded half to even to the nearest multiple; if that leaves the pixel count
    out of bounds, both sides are scaled by one factor and floored (too many) or ceiled (too few). Raises `InputError`
    for an aspect ratio over 200."""
    _check_aspect(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int = 2,
    factor: int = 32,
    min_pixels: int = 4096,
    max_pixels: int = 25165824,
) -> tuple[int, int]:
    """(h, w) for every frame of a clip of `num_frames` (sampled) frames, the Qwen3-VL video rule: like `smart_resize`
    but the pixel bounds apply to `frames x h x w` (the frame count rounded half to even to a multiple of
    `temporal_factor` in the bound checks, the exact count in the scale), and frames with a side under `factor` are
    first scaled up (truncating) so that their shorter side reaches it. Raises `InputError` for fewer frames than
    `temporal_factor` (the reference's rule: a one-frame video is an error) or an aspect ratio over 200."""
    if num_frames < temporal_factor:
        raise InputError(f"a video needs at least {temporal_factor} sampled frames, got {num_frames}")
    _check_positive(height, width)
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    _check_aspect(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ------------------------------------------------------------------------------------------------------------------
# Reading and converting pictures
# ------------------------------------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def load_image(source: str | Path | PIL.Image.Image) -> np.ndarray:
    """uint8 `[H, W, 3]` RGB from an image file or a PIL image, as `transformers.image_utils.load_image` (what the
    processors use for a path or URL) does: the EXIF orientation applied, then PIL's `convert("RGB")` (which drops an
    alpha channel; a PIL image passed straight to `preprocess_images` is instead composited onto white, as the
    processors do). A missing, corrupt or unreadable file raises `InputError` naming it."""
    if isinstance(source, PIL.Image.Image):
        image = PIL.ImageOps.exif_transpose(source)
        return np.asarray(image.convert("RGB"))
    path = Path(source)
    try:
        with PIL.Image.open(path) as opened:
            image = PIL.ImageOps.exif_transpose(opened)
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path}: {_one_line(e)}") from None


def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    """The processors' RGB conversion of a PIL image: transparency composited onto white, else `convert("RGB")`."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """The processors' RGB conversion of a channels-last uint8 array: `[H, W]` / `[H, W, 1]` repeated to 3 channels,
    `[H, W, 4]` composited onto white with rounding."""
    if array.dtype != np.uint8:
        raise InputError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise InputError(f"image arrays must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {list(array.shape)}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:4] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return array


def _to_rgb(image: Any) -> np.ndarray:
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise InputError(f"an image must be a path, a PIL image or a uint8 array, got {type(image).__name__}")


# ------------------------------------------------------------------------------------------------------------------
# Resizing and normalizing
# ------------------------------------------------------------------------------------------------------------------


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """torch's antialiasing bicubic filter (Keys, a = -0.5, as PIL), evaluated in float64 in torch's operation order."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _torch_aa_bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One axis of torch's uint8 antialiased bicubic resize (align_corners=False, no scale factor): per output index
    the first input index `[out]` and int16-valued weights `[out, taps]` (zero past each row's span), and the
    fixed-point precision in bits. Weights are computed in float64 and normalized per output, then scaled by
    `2**precision` (the largest precision, at most 22, at which twice the largest weight still rounds below 2**15)
    and rounded half away from zero."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    taps = math.ceil(support) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    centers = scale * (np.arange(out_size) + 0.5)
    first = np.maximum(np.trunc(centers - support + 0.5).astype(np.int64), 0)
    size = np.minimum(np.trunc(centers + support + 0.5).astype(np.int64), in_size) - first
    size = np.clip(size, 0, taps)
    j = np.arange(taps)
    valid = j[None, :] < size[:, None]
    weights = np.where(valid, _keys_cubic((j[None, :] + first[:, None] - centers[:, None] + 0.5) * invscale), 0.0)
    totals = np.zeros((out_size, 1))
    for k in range(taps):  # summed tap by tap, in torch's order (numpy's pairwise sum could round differently)
        totals[:, 0] += weights[:, k]
    weights = np.where(totals != 0.0, weights / np.where(totals == 0.0, 1.0, totals), 0.0)
    largest = float(weights.max(initial=0.0))
    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    return first, fixed, precision


def _torch_resample_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """Resample uint8 `x` along `axis` to `out_size` with torch's integer arithmetic: a sum of int16 weight x pixel
    products plus half an LSB, shifted down by the precision (flooring) and clamped to [0, 255]."""
    in_size = x.shape[axis]
    first, weights, precision = _torch_aa_bicubic_taps(in_size, out_size)
    acc = np.full(x.shape[:axis] + (out_size,) + x.shape[axis + 1 :], 1 << (precision - 1), np.int32)
    shape = [1] * x.ndim
    shape[axis] = out_size
    for k in range(weights.shape[1]):
        w = weights[:, k]
        if not w.any():
            continue
        index = np.minimum(first + k, in_size - 1)
        acc += np.take(x, index, axis=axis) * w.reshape(shape)  # uint8 x int32 -> int32
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def _resize(frames: np.ndarray, height: int, width: int, backend: str) -> np.ndarray:
    """uint8 `[N, H, W, 3]` -> uint8 `[N, height, width, 3]`, bicubic, as the reference backend resizes."""
    if backend == "pil":
        # One picture at a time, as the reference (Pillow picks the order of its two passes itself).
        return np.stack(
            [np.asarray(PIL.Image.fromarray(f).resize((width, height), resample=PIL.Image.BICUBIC)) for f in frames]
        )
    if frames.shape[1:3] == (height, width):
        return frames  # torchvision returns the input unchanged
    out = np.empty((frames.shape[0], height, width, frames.shape[3]), np.uint8)
    chunk = max(1, (1 << 24) // max(1, frames.shape[1] * max(width, frames.shape[2]) * frames.shape[3]))
    for start in range(0, frames.shape[0], chunk):
        x = frames[start : start + chunk]
        if x.shape[2] != width:  # the width pass first, as torch
            x = _torch_resample_axis(x, 2, width)
        if x.shape[1] != height:
            x = _torch_resample_axis(x, 1, height)
        out[start : start + chunk] = x
    return out


def _normalize(frames: np.ndarray, mean: Sequence[float], std: Sequence[float], rescale: float, backend: str):
    """uint8 `[..., 3]` -> float32 `[..., 3]`: rescaled and normalized with the reference backend's arithmetic."""
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if backend == "pil":
        x = (frames.astype(np.float64) * rescale).astype(np.float32)
        return (x - mean32) / std32
    # torchvision fuses the rescale into float32 mean / std (a float32 tensor times a Python float: float32 math).
    scale = np.float32(1.0 / rescale)
    return (frames.astype(np.float32) - mean32 * scale) / (std32 * scale)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != 3 or len(std) != 3:
        raise InputError(f"image_mean and image_std need 3 values (RGB), got {len(mean)} and {len(std)}")


# ------------------------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------------------------


def preprocess_images(
    images: Any,
    *,
    patch_size: int = 16,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    min_pixels: int = 256 * 256,
    max_pixels: int = 4096 * 4096,
    image_mean: Sequence[float] = (0.5, 0.5, 0.5),
    image_std: Sequence[float] = (0.5, 0.5, 0.5),
    rescale_factor: float = 1 / 255,
    backend: str = "pil",
) -> tuple[np.ndarray, np.ndarray]:
    """(`pixel_values` float32 `[sum(h * w), 3 * T * P * P]`, `image_grid_thw` int64 `[n, 3]` with rows `(1, h, w)`
    in patches), as the reference image processor returns them for `images` (a list of, or one: path, PIL image, or
    channels-last uint8 array `[H, W]` / `[H, W, 1|3|4]`).

    Each image is converted to RGB (transparency onto white), resized (bicubic) to `smart_resize` of its size with
    factor `patch_size * merge_size`, rescaled and normalized (per `backend`, see the module docstring), and cut into
    `P x P` patches in block-major order; a still image is repeated `T = temporal_patch_size` times along time."""
    _check_backend(backend)
    _check_stats(image_mean, image_std)
    if isinstance(images, (str, Path, PIL.Image.Image, np.ndarray)):
        images = [images]
    images = list(images)
    if not images:
        raise InputError("no images given")
    patches, grids = [], []
    for image in images:
        rgb = _to_rgb(image)
        height, width = smart_resize(rgb.shape[0], rgb.shape[1], patch_size * merge_size, min_pixels, max_pixels)
        resized = _resize(rgb[None], height, width, backend)
        pixels = _normalize(resized, image_mean, image_std, rescale_factor, backend)  # [1, h, w, 3]
        clip = np.broadcast_to(pixels, (temporal_patch_size, *pixels.shape[1:]))
        flat, grid = _patchify(clip, patch_size, merge_size, temporal_patch_size)
        patches.append(flat)
        grids.append(grid)
    return np.concatenate(patches, axis=0), np.asarray(grids, np.int64)


def _patchify(clip: np.ndarray, patch: int, merge: int, temporal: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float32 `[frames, H, W, C]` (frames a multiple of `temporal`) -> (`[t * h * w, C * T * P * P]`, `(t, h, w)`),
    rows ordered (t, h / merge, w / merge, merge, merge), columns (C, T, P, P)."""
    frames, height, width, channels = clip.shape
    t, h, w = frames // temporal, height // patch, width // patch
    x = clip.reshape(t, temporal, h // merge, merge, patch, w // merge, merge, patch, channels)
    # axes: 0 t, 1 T, 2 bh, 3 mh, 4 P, 5 bw, 6 mw, 7 P, 8 C -> (t, bh, bw, mh, mw, C, T, P, P)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(x).reshape(t * h * w, channels * temporal * patch * patch), (t, h, w)


# ------------------------------------------------------------------------------------------------------------------
# Videos
# ------------------------------------------------------------------------------------------------------------------


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    target_fps: float = 2.0,
    min_frames: int = 4,
    max_frames: int = 768,
    temporal_patch_size: int = 2,
) -> np.ndarray:
    """int64 `[n]`: which frames of a `total_frames`-frame video at `video_fps` the Qwen3-VL video processor keeps:
    `n = int(total_frames / video_fps * target_fps)` clamped to `[min_frames, max_frames]` and then to
    `total_frames`, spread evenly over the whole video (`linspace(0, total_frames - 1, n)` rounded half to even).

    `temporal_patch_size` does not change the count under the Qwen3-VL rule (Qwen2-VL's rounded it); the frames are
    padded to a multiple of it by repeating the last one in `preprocess_video`."""
    del temporal_patch_size
    if total_frames <= 0:
        raise InputError("the video has no frames")
    if not video_fps or video_fps <= 0:
        raise InputError(f"the video's frame rate must be positive, got {video_fps}")
    count = int(total_frames / video_fps * target_fps)
    count = min(max(count, min_frames), max_frames, total_frames)
    return np.linspace(0, total_frames - 1, count).round().astype(np.int64)


def frame_timestamps(indices: Sequence[int] | np.ndarray, video_fps: float, merge: int = 2) -> list[float]:
    """Seconds, one per temporal patch of `merge` frames: the mean of the times (`index / video_fps`) of the patch's
    first and last frame, the last index repeated to fill the final patch. `<{t:.1f} seconds>` in the prompt."""
    indices = [int(i) for i in indices]
    if not indices:
        raise InputError("no frame indices given")
    if len(indices) % merge:
        indices.extend([indices[-1]] * (merge - len(indices) % merge))
    times = [i / video_fps for i in indices]
    return [(times[i] + times[i + merge - 1]) / 2 for i in range(0, len(times), merge)]


def preprocess_video(
    frames: np.ndarray,
    video_fps: float,
    *,
    patch_size: int = 16,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    min_pixels: int = 4096,
    max_pixels: int = 25165824,
    image_mean: Sequence[float] = (0.5, 0.5, 0.5),
    image_std: Sequence[float] = (0.5, 0.5, 0.5),
    rescale_factor: float = 1 / 255,
    target_fps: float = 2.0,
    min_frames: int = 4,
    max_frames: int = 768,
    sample: bool = True,
    cap_pixels_per_frame: bool = False,
    max_video_tokens: int = 768,
    backend: str = "torchvision",
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(`pixel_values_videos` float32 `[t * h * w, 3 * T * P * P]`, `video_grid_thw` int64 `[1, 3]` = `(t, h, w)` in
    patches, `timestamps` list of `t` floats in seconds), as `Qwen3VLVideoProcessor` + `Qwen3VLProcessor` compute
    them for all `frames` uint8 `[N, H, W, 3]` of a video at `video_fps` frames per second.

    Frames are sampled with `sample_frame_indices` (`sample=False` keeps them all, the reference's
    `do_sample_frames=False`), all resized (bicubic) to `smart_resize_video` of the sampled count and frame size,
    rescaled and normalized (per `backend`), padded to a multiple of `temporal_patch_size` by repeating the last, and
    cut into patches. `cap_pixels_per_frame` / `max_video_tokens` are the reference's opt-in per-frame budget (off by
    default in `transformers` 5.23)."""
    _check_backend(backend)
    _check_stats(image_mean, image_std)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"video frames must be uint8 [N, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if frames.shape[0] == 0:
        raise InputError("the video has no frames")
    if not video_fps or video_fps <= 0:
        raise InputError(f"the video's frame rate must be positive, got {video_fps}")
    if sample:
        indices = sample_frame_indices(frames.shape[0], video_fps, target_fps, min_frames, max_frames)
    else:
        indices = np.arange(frames.shape[0])
    clip = frames[indices]
    factor = patch_size * merge_size
    if cap_pixels_per_frame:
        per_frame = max(min(max_video_tokens * factor * factor, max_pixels // len(clip)), int(min_pixels * 1.05))
        max_pixels = per_frame * len(clip)
    height, width = smart_resize_video(
        len(clip), clip.shape[1], clip.shape[2], temporal_patch_size, factor, min_pixels, max_pixels
    )
    pixels = _normalize(_resize(clip, height, width, backend), image_mean, image_std, rescale_factor, backend)
    if pad := -len(pixels) % temporal_patch_size:
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)], axis=0)
    flat, grid = _patchify(pixels, patch_size, merge_size, temporal_patch_size)
    timestamps = frame_timestamps(indices, video_fps, temporal_patch_size)
    return flat, np.asarray([grid], np.int64), timestamps


_VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".gif", ".ts"}


def load_video(path: str | Path, *, fps: float = 2.0) -> tuple[np.ndarray, float]:
    """(frames uint8 `[N, H, W, 3]` RGB, frames per second) of a video file, every frame decoded (with PyAV, which
    bundles FFmpeg; the rate is the stream's average frame rate), or of a folder of image files taken in name order
    as the frames of a video at `fps`. An unreadable file, a folder with no image in it, frames of different sizes, or
    a video with no frames raise `InputError` naming the path."""
    path = Path(path)
    if path.is_dir():
        return _load_frame_folder(path, fps)
    if not path.is_file():
        raise InputError(f"cannot read video {path}: no such file or folder")
    import av.error  # lazily: only video files need it (this binds `av` too)

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"cannot read video {path}: it has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except InputError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"cannot read video {path}: {_one_line(e)}") from None
    if not frames:
        raise InputError(f"the video {path} has no frames")
    if not rate or float(rate) <= 0:
        raise InputError(f"cannot read video {path}: its frame rate is unknown")
    return np.stack(frames), float(rate)


def _load_frame_folder(folder: Path, fps: float) -> tuple[np.ndarray, float]:
    if not fps or fps <= 0:
        raise InputError(f"the frame rate of the frames in {folder} must be positive, got {fps}")
    extensions = set(PIL.Image.registered_extensions())
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in extensions)  # fmt: skip
    if not files:
        raise InputError(f"the video folder {folder} has no image frames")
    frames = [load_image(p) for p in files]
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise InputError(f"the frames in {folder} differ in size: {sorted(s[:2] for s in shapes)}")
    return np.stack(frames), float(fps)


# ------------------------------------------------------------------------------------------------------------------
# Prompt text
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VisionTokens:
    """The placeholder and marker strings of the Qwen-VL tokenizers."""

    image: str = "<|image_pad|>"
    video: str = "<|video_pad|>"
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"


def expand_vision_placeholders(
    text: str | list[str],
    image_grid_thw: Any = None,
    video_grid_thw: Any = None,
    video_timestamps: Sequence[Sequence[float]] | None = None,
    merge_size: int = 2,
    tokens: VisionTokens = VisionTokens(),
    *,
    keep_outer_markers: bool = True,
) -> str | list[str]:
    """`text` (one prompt or a batch, whose placeholders are numbered across the batch) with the i-th image placeholder
    replaced by `prod(image_grid_thw[i]) / merge_size**2` image placeholders, and the i-th video placeholder by, for
    each of its `t` temporal patches, `<{timestamp:.1f} seconds>` + vision_start + `h * w / merge_size**2` video
    placeholders + vision_end, as `Qwen3VLProcessor.__call__` of `transformers` 5.23 does.

    That processor replaces only the video placeholder, so the vision_start / vision_end pair that the chat template
    writes around it stays: `<|vision_start|><0.5 seconds><|vision_start|>...<|vision_end|>...<|vision_end|>`.
    `keep_outer_markers=False` gives the original Qwen3-VL processor's text (and `transformers` 4.57's): a
    vision_start + placeholder + vision_end triple is replaced whole.

    More or fewer placeholders than grids, or a video whose timestamps are not one per temporal patch, raise
    `InputError` naming the counts."""
    batch = [text] if isinstance(text, str) else list(text)
    images, videos = _grids(image_grid_thw), _grids(video_grid_thw)
    stamps = [list(s) for s in (video_timestamps or [])]
    n_image_tokens = sum(sample.count(tokens.image) for sample in batch)
    n_video_tokens = sum(sample.count(tokens.video) for sample in batch)
    if n_image_tokens != len(images):
        raise InputError(
            f"the prompt has {n_image_tokens} image placeholders ({tokens.image}) but {len(images)} images were given"
        )
    if n_video_tokens != len(videos):
        raise InputError(
            f"the prompt has {n_video_tokens} video placeholders ({tokens.video}) but {len(videos)} videos were given"
        )
    if len(stamps) != len(videos):
        raise InputError(f"{len(videos)} videos but timestamps for {len(stamps)}")
    merge = merge_size * merge_size
    image_texts = [tokens.image * (t * h * w // merge) for t, h, w in images]
    video_texts = []
    for (t, h, w), times in zip(videos, stamps):
        if len(times) != t:
            raise InputError(f"a video of {t} temporal patches needs {t} timestamps, got {len(times)}")
        frame = tokens.vision_start + tokens.video * (h * w // merge) + tokens.vision_end
        video_texts.append("".join(f"<{s:.1f} seconds>" + frame for s in times))
    video_pattern = re.escape(tokens.video)
    if not keep_outer_markers:
        triple = re.escape(tokens.vision_start + tokens.video + tokens.vision_end)
        video_pattern = f"{triple}|{video_pattern}"
    pattern = re.compile(f"(?P<image>{re.escape(tokens.image)})|(?P<video>{video_pattern})")
    image_iter, video_iter = iter(image_texts), iter(video_texts)
    out = [pattern.sub(lambda m: next(image_iter) if m.lastgroup == "image" else next(video_iter), s) for s in batch]
    return out[0] if isinstance(text, str) else out


def _grids(grid_thw: Any) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    return [(int(t), int(h), int(w)) for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3)]


def mm_token_type_ids(input_ids: Any, image_token_id: int, video_token_id: int) -> np.ndarray:
    """int32 array shaped like `input_ids`: 0 for text, 1 for image placeholders, 2 for video placeholders (the
    processor's `mm_token_type_ids`)."""
    ids = np.asarray(input_ids)
    types = np.zeros(ids.shape, np.int32)
    types[ids == image_token_id] = 1
    types[ids == video_token_id] = 2
    return types
