"""Trained parameters -> a model directory (`qwen_jax.checkpoint.format`, the layout `tools/convert.py` writes), so
`qwen_jax.load`, `python -m qwen_jax.sample --ckpt DIR` and the exporter read a training run's result.

The directory gets `config.json` (the model config as given), the tokenizer files, `params/<group>/` per top-level
parameter group in the storage layout (`layers_{i}` per decoder layer) and `qwen_jax.json`. A model fine-tuned from
a converted directory keeps that directory's source record (so an export can rebuild the original layout), its
image/video processor settings and its `mtp/` tensors; one trained from scratch has no source record (the exporter then writes the official layout). The
directory is built in a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from qwen_jax.checkpoint.format import FORMAT_NAME, FORMAT_VERSION, METADATA_FILE, MTP_DIR, PARAMS_DIR, save_tree
from qwen_jax.checkpoint.hf_mapping import keeps_float32
from qwen_jax.config import TextConfig
from qwen_jax.errors import InputError
from qwen_jax.stacking import unstack_layers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt")  # fmt: skip
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


def storage_params(params: Any, config: TextConfig, dtype: Any) -> dict:
    """Host (numpy) parameters in the storage layout, floating leaves cast to `dtype` except those kept float32."""

    def cast(path: tuple, x: Any) -> np.ndarray:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        x = np.asarray(jax.device_get(x))
        if not np.issubdtype(x.dtype, np.floating) and x.dtype.kind != "V":
            return x
        return x.astype(np.float32 if keeps_float32(name) else dtype)

    return jax.tree.map_with_path(cast, unstack_layers(dict(params), config))


def save_model_dir(
    output: str | Path,
    params: Any,
    config: TextConfig,
    raw_config: dict,
    tokenizer_dir: str | Path,
    dtype: str = "float32",
    init_dir: str | Path | None = None,
) -> Path:
    """Write the model directory `output` (which must not exist) and return its path.

    params: stacked or storage layout (a `visual` group is saved as is); raw_config: the `config.json` dict;
    dtype: "float32" or "bfloat16" storage; init_dir: the model directory training started from (its source record
    and `mtp/` are kept)."""
    import jax.numpy as jnp

    output = Path(output)
    if output.exists():
        raise InputError(f"{output} already exists; choose a new output directory")
    tree = storage_params(params, config, np.dtype(jnp.dtype(dtype)))
    source_meta: dict = {}
    if init_dir is not None:
        source_meta = json.loads((Path(init_dir) / METADATA_FILE).read_text())
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        for group, subtree in tree.items():
            save_tree(tmp / PARAMS_DIR / group, subtree)
        for name in PROCESSOR_FILES if init_dir is not None else ():
            if (Path(init_dir) / name).is_file():
                shutil.copy2(Path(init_dir) / name, tmp / name)
        if init_dir is not None and (Path(init_dir) / MTP_DIR).is_dir():
            shutil.copytree(Path(init_dir) / MTP_DIR, tmp / MTP_DIR)
        metadata = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model_type": raw_config.get("model_type"),
            "dtype": dtype,
            "trained": True,
        }
        for key in ("expert_layout", "source_index", "source_files", "tensors", "mtp", "set_aside"):
            if key in source_meta:
                metadata[key] = source_meta[key]
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
        os.chmod(tmp, 0o755)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
