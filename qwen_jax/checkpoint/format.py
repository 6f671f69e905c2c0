"""This library's on-disk model format (version 1).

A model directory holds:
- `config.json` and the other non-weight files of the source checkpoint (tokenizer, chat template, generation
  config, the safetensors index), copied unchanged;
- `params/<group>/`: one Orbax checkpoint per top-level entry of the parameter tree (`embed_tokens`, `layers_0`,
  ..., `norm`, `lm_head`, `visual`), paths inside as in `qwen_jax.model` (e.g. `linear_attn/in_proj_qkv/kernel`
  under `params/layers_0/`); written one group at a time, so converting needs memory for one decoder layer only;
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


def param_groups(directory: Path) -> list[str]:
    """The top-level parameter groups saved under a `params/` directory."""
    return sorted(p.name for p in Path(directory).iterdir() if p.is_dir())


def restore_params(directory: Path, targets: dict | None = None) -> dict:
    """The whole parameter tree from `params/`; `targets` (per group, a tree of `jax.ShapeDtypeStruct` with
    shardings) restores each array straight into its sharding."""
    import orbax.checkpoint as ocp

    tree = {}
    with ocp.StandardCheckpointer() as checkpointer:
        for group in param_groups(directory):
            path = (Path(directory) / group).absolute()
            tree[group] = checkpointer.restore(path, None if targets is None else targets[group])
    return tree


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


def cast_tree(tree: dict, dtype: Any, prefix: str = "") -> dict:
    """Cast floating leaves to `dtype`, except the ones kept in float32 (`keeps_float32`). `prefix` is the tree's
    own path in the whole parameter tree (e.g. "norm/" for the final norm's group)."""
    import jax.numpy as jnp

    from qwen_jax.checkpoint.hf_mapping import keeps_float32

    def cast(path: str, x: Any) -> Any:
        if keeps_float32(path):
            return x.astype(jnp.float32)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    def walk(node: dict, prefix: str) -> dict:
        return {k: walk(v, f"{prefix}{k}/") if isinstance(v, dict) else cast(prefix + k, v) for k, v in node.items()}

    return walk(tree, prefix)
