"""Hugging Face checkpoint directory (config.json + safetensors) -> model directory (`qwen_jax.checkpoint.format`).

Everything that can be checked is checked before anything is written (config, file integrity, every key and shape);
the output is built in a temporary sibling directory and renamed into place only when complete, so DST appears
whole or not at all.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from qwen_jax.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_FILE,
    MTP_DIR,
    PARAMS_DIR,
    save_tree,
    set_path,
)  # fmt: skip
from qwen_jax.checkpoint.fp8 import SCALE_SUFFIX, DequantizingReader
from qwen_jax.checkpoint.hf_mapping import apply_rule, keeps_float32, plan
from qwen_jax.checkpoint.safetensors_io import SafetensorsCheckpoint
from qwen_jax.config import load_config
from qwen_jax.errors import InputError

DTYPES = {"bfloat16": "bfloat16", "float32": "float32"}


class ConversionError(InputError):
    """A conversion that cannot proceed."""


def _target_dtype(path: str, source: np.dtype, requested: str | None) -> np.dtype:
    import jax.numpy as jnp

    if keeps_float32(path):
        return np.dtype(np.float32)
    if requested is None or not jnp.issubdtype(source, jnp.floating):
        return source
    return np.dtype(jnp.dtype(requested))


def convert(
    src: str | Path,
    dst: str | Path,
    dtype: str | None = None,
    log: Callable[[str], None] = print,
    expert_layout: str | None = None,
) -> None:
    """Convert the checkpoint at `src` into a model directory at `dst` (which must not exist).

    expert_layout: "v5" or "legacy" for fused expert tensors whose layout their shapes cannot tell (see
    `hf_mapping.expert_layout`); None decides by shape, then by the recorded `transformers_version`.
    """
    from qwen_jax.model import param_shapes

    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"unsupported --dtype {dtype!r} (choose bfloat16 or float32)")
    if not src.is_dir():
        raise ConversionError(f"{src}: no such directory")
    if dst.exists():
        raise ConversionError(f"{dst} already exists; choose a new destination")
    config = load_config(src)
    ckpt = DequantizingReader(SafetensorsCheckpoint(src))
    version = json.loads((src / "config.json").read_text()).get("transformers_version")
    mapping = plan(config, {k: ckpt.info(k)[1] for k in ckpt.keys()}, expert_layout, version)
    for rule in mapping.rules:
        for key, expected in zip(rule.sources, rule.source_shapes):
            shape = ckpt.info(key)[1]
            if shape != expected:
                raise ConversionError(f"{key}: shape {list(shape)} but the config implies {list(expected)}")
    if mapping.set_aside:
        log(f"note: {len(mapping.set_aside)} vision tensors (model.visual.*) set aside: a text-only config")

    expected = param_shapes(config.text)
    if config.vision is not None:
        from qwen_jax.vision import vision_param_shapes

        expected["visual"] = vision_param_shapes(config.vision)
    groups: dict[str, list] = {}
    for rule in mapping.rules:  # one group per top-level parameter (a decoder layer, the embedding, ...)
        groups.setdefault(rule.targets[0].split("/")[0], []).append(rule)
    missing = sorted(set(expected) - set(groups))
    if missing:
        raise ConversionError(f"the checkpoint provides nothing for {', '.join(missing)}")

    from tqdm import tqdm

    total = sum(ckpt.nbytes(k) for k in [*(k for r in mapping.rules for k in r.sources), *mapping.mtp_keys])
    progress = tqdm(total=total, desc="converting", unit="B", unit_scale=True, unit_divisor=1024, disable=None)
    records = []
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)
        # One group at a time, so peak memory is about one decoder layer whatever the model's size.
        for name, rules in groups.items():
            tree: dict = {}
            for rule in rules:
                records.append(_convert_rule(rule, ckpt, config, dtype, tree))
                progress.update(sum(ckpt.nbytes(k) for k in rule.sources))
            _check_against_model(tree[name], expected[name], f"{name}/")
            save_tree(tmp / PARAMS_DIR / name, tree[name])
            del tree
            _release_memory()
        mtp: dict = {}
        for key in mapping.mtp_keys:
            array = ckpt.read(key)
            set_path(mtp, key.replace(".", "/"), array.astype(_target_dtype(key, array.dtype, dtype)))
            progress.update(ckpt.nbytes(key))
        if mtp:
            save_tree(tmp / MTP_DIR, mtp)
        progress.close()
        metadata = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model_type": config.model_type,
            "dtype": dtype,
            "expert_layout": mapping.expert_layout,
            "source_index": ckpt.index_file,
            "source_files": {name: f.metadata for name, f in ckpt.files.items()},
            "tensors": records,
            "mtp": {"dir": MTP_DIR, "keys": mapping.mtp_keys, "sources": [_source(k, ckpt) for k in mapping.mtp_keys]}
            if mtp
            else None,
            "set_aside": mapping.set_aside,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
        os.rename(tmp, dst)
    except BaseException:
        progress.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {dst} ({len(records)} rules, {sum(len(r['targets']) for r in records)} parameters)")


def _release_memory() -> None:
    """Hand freed buffers back to the operating system between groups (glibc keeps them per thread otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _convert_rule(rule, ckpt, config, dtype: str | None, tree: dict) -> dict:
    """Apply one rule, placing its outputs in `tree`; returns its record for the metadata."""
    arrays = apply_rule(rule, [ckpt.read(k) for k in rule.sources], config.text)
    targets = []
    for path, array in zip(rule.targets, arrays):
        array = array.astype(_target_dtype(path, array.dtype, dtype), copy=False)
        set_path(tree, path, array)
        targets.append({"path": path, "dtype": str(array.dtype), "shape": list(array.shape)})
    return {"op": rule.op, "sources": [_source(k, ckpt) for k in rule.sources], "targets": targets}


def _source(key: str, ckpt) -> dict:
    """The metadata record of one source tensor: its key, file, dtype and shape."""
    dtype, shape = ckpt.info(key)
    record = {"key": key, "file": ckpt.key_file[key], "dtype": dtype, "shape": list(shape)}
    return record | ({"fp8_block_scales": key + SCALE_SUFFIX} if key in ckpt.scaled else {})


def _check_against_model(params: dict, expected: dict, prefix: str = "") -> None:
    """The converted tree must have exactly the model's parameter paths and shapes."""
    if set(params) != set(expected):
        extra, missing = sorted(set(params) - set(expected)), sorted(set(expected) - set(params))
        raise ConversionError(
            f"converted tree differs from the model at {prefix or '/'}: extra {extra}, missing {missing}"
        )
    for k, v in expected.items():
        if isinstance(v, dict):
            _check_against_model(params[k], v, f"{prefix}{k}/")
        elif tuple(params[k].shape) != tuple(v.shape):
            raise ConversionError(f"{prefix}{k}: converted shape {params[k].shape}, model expects {v.shape}")
