"""This library's on-disk model format (version 1).

A model directory holds:
- `config.json` and the other non-weight files of the source checkpoint (tokenizer, chat template, generation
  config, the safetensors index), copied unchanged;
- `params/`: an Orbax checkpoint of the parameter tree (paths as in `qwen_jax.model`, e.g.
  `layers_0/linear_attn/in_proj_qkv/kernel`);
- `mtp/` (only if the source has `mtp.*` tensors): an Orbax checkpoint of those tensors, unchanged, nested by key;
- `qwen_jax.json`: `{"format": "qwen-jax", "version": 1, ...}` with, for every conversion rule, its layout op, the
  source keys (file, dtype, shape) and the target paths and dtypes, so an export can rebuild the original files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwen_jax.errors import InputError

FORMAT_NAME = "qwen-jax"
FORMAT_VERSION = 1
METADATA_FILE = "qwen_jax.json"
PARAMS_DIR = "params"
MTP_DIR = "mtp"


class FormatError(InputError):
    """A directory that is not a model directory of a supported format version."""


def set_path(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def save_tree(directory: Path, tree: dict) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory.absolute(), tree)


def restore_tree(directory: Path) -> dict:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(directory.absolute())


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    file = path / METADATA_FILE
    if not path.is_dir():
        raise FormatError(f"{path}: no such directory")
    if not file.exists():
        raise FormatError(
            f"{path}: not a qwen-jax model directory (no {METADATA_FILE}); convert it with tools/convert.py"
        )
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{file}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise FormatError(
            f"{file}: format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this library reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    return meta


def cast_tree(tree: dict, dtype: Any) -> dict:
    """Cast floating leaves to `dtype`, except the ones kept in float32 (`keeps_float32`)."""
    import jax.numpy as jnp

    from qwen_jax.checkpoint.hf_mapping import keeps_float32

    def cast(path: str, x: Any) -> Any:
        if keeps_float32(path):
            return x.astype(jnp.float32)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    def walk(node: dict, prefix: str) -> dict:
        return {k: walk(v, f"{prefix}{k}/") if isinstance(v, dict) else cast(prefix + k, v) for k, v in node.items()}

    return walk(tree, "")
