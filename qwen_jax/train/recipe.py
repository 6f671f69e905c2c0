"""The training recipe: one JSON file (e.g. `configs/demo-train.json`) -> a frozen, checked `Recipe`.

Relative paths in the file are taken from the file's own directory, so a recipe runs from any working directory.
`key=value` overrides (values parsed as JSON, else taken as strings) replace top-level keys; the recipe's `smoke`
entry is a dict of overrides that `--smoke` applies (a few steps of a small run, for CI).

| key | meaning |
|---|---|
| `model_config` | a model `config.json` in the Hugging Face format (training from scratch); or |
| `init` | a model directory (`tools/convert.py` output, or a previous run's output) to fine-tune |
| `tokenizer` | a directory with `tokenizer.json` / `tokenizer_config.json` (default: `init`'s) |
| `data` | list of `.txt` / `.jsonl` files or directories (`qwen_jax.train.data.load_documents`) |
| `delimiter` | regular expression splitting text files into documents (default: one document per file) |
| `held_out_fraction` | documents held out for evaluation (`split_documents`) |
| `seq_len`, `batch_size`, `grad_accum` | rows of `seq_len` tokens per micro-batch, micro-batches per optimizer step |
| `steps`, `warmup_steps`, `learning_rate`, `end_learning_rate_fraction` | linear warmup from 0, cosine decay |
| `weight_decay`, `adam_b1`, `adam_b2`, `adam_eps`, `clip_norm` | AdamW (decay on matrices only) and clipping |
| `frozen` | parameter path patterns (`fnmatch`, e.g. `"visual/*"`) that are not trained |
| `dtype` | parameter and compute dtype while training (`float32` or `bfloat16`) |
| `save_dtype` | dtype of the saved model (`float32` / `bfloat16`; norms, `A_log`, `dt_bias` stay float32) |
| `aux_loss_coef` | MoE load-balancing weight; null: the config's `router_aux_loss_coef` if `output_router_logits` |
| `remat`, `loss_chunk` | rematerialize each layer-pattern repeat; tokens per cross-entropy chunk |
| `checkpoint_every`, `keep_checkpoints`, `log_every` | train-state checkpoints and console/JSONL metrics |
| `run_dir` | checkpoints (`checkpoints/`) and metrics (`metrics.jsonl`); a rerun resumes from its latest checkpoint |
| `output` | the trained model directory (must not exist; written atomically at the end) |
| `image_patches_per_row` | image patches each packed row holds (conversations with images; a multiple of 4) |
| `mesh` | a mesh spec such as `"data=2,fsdp=2"` (null: no mesh) |
| `seed` | parameter initialization and data order |
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen_jax.errors import InputError

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Recipe:
    data: tuple[str, ...]
    run_dir: str
    output: str
    model_config: str | None = None
    init: str | None = None
    tokenizer: str | None = None
    delimiter: str | None = None
    held_out_fraction: float = 0.1
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    warmup_steps: int = 50
    learning_rate: float = 1e-3
    end_learning_rate_fraction: float = 0.1
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    clip_norm: float = 1.0
    frozen: tuple[str, ...] = ()
    dtype: str = "float32"
    save_dtype: str = "float32"
    aux_loss_coef: float | None = None
    remat: bool = False
    loss_chunk: int = 1024
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    image_patches_per_row: int = 4096
    mesh: str | None = None
    seed: int = 0


PATH_KEYS = ("model_config", "init", "tokenizer", "run_dir", "output")
FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}


def parse_override(text: str) -> tuple[str, Any]:
    """`"key=value"` -> (key, value): the value as JSON if it parses, else the string itself."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InputError(f"override {text!r}: expected key=value")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _check_type(key: str, value: Any) -> Any:
    annotation = str(FIELDS[key].type)
    if value is None and ("None" in annotation):
        return None
    if key in ("data", "frozen"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(f"recipe key {key!r}: expected a list of strings, got {value!r}")
        return tuple(value)
    if annotation.startswith("bool"):
        if not isinstance(value, bool):
            raise InputError(f"recipe key {key!r}: expected true or false, got {value!r}")
        return value
    if annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"recipe key {key!r}: expected an integer, got {value!r}")
        return value
    if annotation.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"recipe key {key!r}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise InputError(f"recipe key {key!r}: expected a string, got {value!r}")
    return value


def _check(recipe: Recipe) -> None:
    positive = ("seq_len", "batch_size", "grad_accum", "steps", "loss_chunk", "checkpoint_every", "log_every",
                "keep_checkpoints", "image_patches_per_row")  # fmt: skip
    for key in positive:
        if getattr(recipe, key) < 1:
            raise InputError(f"recipe key {key!r}: must be >= 1, got {getattr(recipe, key)}")
    if recipe.seq_len < 2:
        raise InputError(f"recipe key 'seq_len': must be >= 2, got {recipe.seq_len}")
    if not 0 <= recipe.warmup_steps <= recipe.steps:
        raise InputError(f"recipe key 'warmup_steps': must be in [0, steps], got {recipe.warmup_steps}")
    if recipe.learning_rate <= 0 or not 0 <= recipe.end_learning_rate_fraction <= 1:
        raise InputError("recipe: learning_rate must be > 0 and end_learning_rate_fraction in [0, 1]")
    if recipe.clip_norm <= 0:
        raise InputError(f"recipe key 'clip_norm': must be > 0, got {recipe.clip_norm}")
    for key in ("dtype", "save_dtype"):
        if getattr(recipe, key) not in DTYPES:
            raise InputError(f"recipe key {key!r}: {getattr(recipe, key)!r}, choose one of {', '.join(DTYPES)}")
    if (recipe.model_config is None) == (recipe.init is None):
        raise InputError("recipe: give exactly one of 'model_config' (train from scratch) and 'init' (fine-tune)")
    if recipe.tokenizer is None and recipe.init is None:
        raise InputError("recipe: 'tokenizer' is required when training from scratch")
    if not recipe.data:
        raise InputError("recipe key 'data': no data paths")


def _resolve(values: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths of `values` taken from `base`."""
    out = dict(values)
    for key in PATH_KEYS:
        if isinstance(out.get(key), str):
            out[key] = str(base / out[key])
    if isinstance(out.get("data"), str):
        out["data"] = [out["data"]]
    if isinstance(out.get("data"), list):
        out["data"] = [str(base / p) if isinstance(p, str) else p for p in out["data"]]
    return out


def make_recipe(
    raw: dict[str, Any], base: str | Path = ".", overrides: Sequence[str] = (), smoke: bool = False
) -> Recipe:
    """A checked `Recipe` from a parsed recipe dict. Relative paths in `raw` (and its `smoke` overrides) are taken
    from `base`, those in `overrides` from the working directory."""
    if not isinstance(raw, dict):
        raise InputError("the recipe must be a JSON object")
    base = Path(base)
    smoke_overrides = raw.get("smoke", {})
    values = _resolve({k: v for k, v in raw.items() if not k.startswith("_") and k != "smoke"}, base)
    if smoke:
        if not isinstance(smoke_overrides, dict):
            raise InputError("recipe key 'smoke': expected an object of overrides")
        values.update(_resolve(smoke_overrides, base))
    for override in overrides:
        values.update(_resolve(dict([parse_override(override)]), Path()))
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise InputError(f"unknown recipe key(s): {', '.join(unknown)} (known: {', '.join(FIELDS)})")
    missing = [k for k in ("data", "run_dir", "output") if k not in values]
    if missing:
        raise InputError(f"recipe: missing key(s) {', '.join(missing)}")
    recipe = Recipe(**{k: _check_type(k, v) for k, v in values.items()})
    _check(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = (), smoke: bool = False) -> Recipe:
    """Read and check a recipe file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such recipe file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    return make_recipe(raw, path.parent, overrides, smoke)
