"""Model directory (`qwen_jax.checkpoint.format`) -> Hugging Face checkpoint: the converter run backwards.

The rules are the converter's, read the other way (`hf_mapping.invert_rule`). Two layouts:

- "source" (the default): the key names, layout, files and dtypes the source had, as `qwen_jax.json` recorded them
  per rule at conversion, so a round trip reproduces the original tensors bit for bit (FP8 weights excepted: they
  come back as the bfloat16 the converter dequantized them to, without their block scales).
- "official": the layout of the official releases, derived from the config alone; also what a model directory with
  no source record (the demo model, a model trained from scratch) is written in. Per text `model_type`:
  - Text keys under `model.language_model.` for the vision-language types (`qwen3_5`, `qwen3_5_moe`, `qwen3_vl`,
    `qwen3_vl_moe`: the released checkpoints, e.g. Qwen3.5-35B-A3B, are these composite models), `model.` for the
    text-only ones (`qwen3_next`, `qwen3_5_text`, `qwen3_5_moe_text`: what their `*ForCausalLM` saves); the vision
    tower under `model.visual.`, `lm_head.weight` at the top (absent when tied).
  - `qwen3_next`: fused `linear_attn.in_proj_qkvz` / `in_proj_ba` (the only form `Qwen3NextGatedDeltaNet` has) and
    per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`, as Qwen3-Next-80B-A3B ships them (transformers merges
    them on load: the `qwen2_moe` rule of `conversion_mapping.py`).
  - `qwen3_5_moe_text`: fused `mlp.experts.gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`, as the Qwen3.5-MoE
    releases ship them (the 35B-A3B index holds 40 + 40 fused tensors).
  - `qwen3_vl_moe_text`: the official Qwen3-VL-MoE transposed layout `gate_up_proj [E, H, 2I]` / `down_proj
    [E, I, H]`, which transformers transposes on load (`Transpose(1, 2, check_dims=True)`, the `qwen3_vl_moe` rule).
    Where hidden == 2I or hidden == I that check cannot see the transpose (transformers issue #47031), so there the
    `[E, 2I, H]` layout is written instead, which loads correctly either way.
  - Dtypes: each tensor as our tree holds it (a bfloat16 model keeps its float32 norms, `A_log` and `dt_bias`; a
    model trained in float32 stays float32). Shards of at most `max_shard_size` bytes (one larger tensor gets its
    own), with `model.safetensors.index.json` when there is more than one.

Both layouts copy the non-weight files (config.json, tokenizer files, chat template, generation_config.json) and keep
the `mtp.*` tensors under their original keys. Memory holds one parameter group (a decoder layer) at a time: every
output file's header is laid out first, then each tensor is written into its place as its group is read. The
output is built in a temporary sibling directory and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qwen_jax.checkpoint.format import (
    METADATA_FILE,
    MTP_DIR,
    PARAMS_DIR,
    param_groups,
    read_metadata,
    restore_tree,
)  # fmt: skip
from qwen_jax.checkpoint.hf_mapping import OPS, Rule, checkpoint_rules, invert_rule
from qwen_jax.checkpoint.safetensors_io import DTYPES, INDEX_FILE
from qwen_jax.config import LINEAR_ATTENTION, ModelConfig, load_config
from qwen_jax.errors import InputError

LAYOUTS = ("source", "official")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
# Fused expert layout of the official releases per text model_type ("per_expert": one tensor per expert).
OFFICIAL_EXPERTS = {"qwen3_next": "per_expert", "qwen3_5_moe_text": "v5", "qwen3_vl_moe_text": "legacy"}
SAFETENSORS_NAMES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class ExportError(InputError):
    """An export that cannot proceed."""


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor of the output checkpoint."""

    key: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclasses.dataclass
class Layout:
    """What to write: the rules that rebuild the tensors, every output tensor, and which file holds it."""

    rules: list[Rule]
    mtp_keys: list[str]
    tensors: dict[str, Tensor]
    files: dict[str, list[str]]  # file name -> keys, in header order
    file_metadata: dict[str, dict[str, str]]
    index: bool  # write `model.safetensors.index.json`


def parse_size(text: str) -> int:
    """'5GB', '40KB', '2GiB' or a plain number of bytes -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).upper() not in _SIZE_UNITS:
        raise ExportError(f"not a size: {text!r} (e.g. 5GB, 500MB, 40KB)")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size < 1:
        raise ExportError(f"shard size must be positive, got {text!r}")
    return size


def export(
    src: str | Path,
    dst: str | Path,
    layout: str = "source",
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    log: Callable[[str], None] = print,
) -> None:
    """Write the model directory `src` as a Hugging Face checkpoint directory `dst` (which must not exist).

    layout: "source" (the converted checkpoint's own keys, layout and dtypes; "official" where `src` has no source
    record) or "official". max_shard_size: bytes per safetensors shard for the official layout.
    """
    src, dst = Path(src), Path(dst)
    if layout not in LAYOUTS:
        raise ExportError(f"unknown layout {layout!r} (choose {' or '.join(LAYOUTS)})")
    meta = read_metadata(src)
    if dst.exists():
        raise ExportError(f"{dst} already exists; choose a new destination")
    config = load_config(src)
    stored = _stored_arrays(src)
    if layout == "source" and not meta.get("tensors"):
        log(f"note: {src} records no source checkpoint; writing the official layout")
        layout = "official"
    plan = _source_layout(meta, src, stored) if layout == "source" else _official_layout(config, stored, max_shard_size)
    if layout == "official" and _ambiguous_experts(config):
        log("note: hidden size == (2x) moe_intermediate_size, so experts are written [E, 2I, H], not transposed")
    if meta.get("set_aside"):
        log(f"note: {len(meta['set_aside'])} tensors set aside at conversion (model.visual.*) are not in {src}")

    from tqdm import tqdm

    total = sum(t.nbytes for t in plan.tensors.values())
    progress = tqdm(total=total, desc="exporting", unit="B", unit_scale=True, unit_divisor=1024, disable=None)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        _copy_other_files(src, tmp, log)
        writer = SafetensorsWriter(tmp, {f: [plan.tensors[k] for k in keys] for f, keys in plan.files.items()},
                                   plan.file_metadata)  # fmt: skip
        groups: dict[str, list[Rule]] = {}
        for rule in plan.rules:  # one group per top-level parameter, as the converter wrote them
            groups.setdefault(rule.targets[0].split("/")[0], []).append(rule)
        for name, rules in groups.items():
            tree = {name: restore_tree(src / PARAMS_DIR / name)}
            for rule in rules:
                for key, array in zip(rule.sources, _invert(rule, tree, config)):
                    writer.write(key, array.astype(plan.tensors[key].dtype, copy=False))
                    progress.update(plan.tensors[key].nbytes)
            del tree
        if plan.mtp_keys:
            mtp = restore_tree(src / MTP_DIR)
            for key in plan.mtp_keys:
                writer.write(key, np.asarray(_get(mtp, _mtp_path(key))).astype(plan.tensors[key].dtype))
                progress.update(plan.tensors[key].nbytes)
        writer.close()
        progress.close()
        if plan.index:
            _write_index(src, tmp, plan)
        os.rename(tmp, dst)
    except BaseException:
        progress.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {dst} ({layout} layout, {len(plan.tensors)} tensors in {len(plan.files)} file(s))")


def _stored_arrays(src: Path) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Dtype and shape of every stored array, by path ("layers_0/linear_attn/A_log", "mtp/fc/weight"), read from
    the Orbax metadata without loading any array."""
    import orbax.checkpoint as ocp

    directories = [(src / PARAMS_DIR / g, g + "/") for g in param_groups(src / PARAMS_DIR)]
    if (src / MTP_DIR).is_dir():
        directories.append((src / MTP_DIR, ""))
    out = {}
    with ocp.StandardCheckpointer() as checkpointer:
        for directory, prefix in directories:
            _flatten(checkpointer.metadata(directory.absolute()).item_metadata.tree, prefix, out)
    return out


def _flatten(tree: dict, prefix: str, out: dict) -> None:
    for k, v in tree.items():
        if isinstance(v, dict):
            _flatten(v, f"{prefix}{k}/", out)
        else:
            out[prefix + k] = (np.dtype(v.dtype), tuple(v.shape))


def _get(tree: dict, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _mtp_path(key: str) -> str:
    return key.replace(".", "/")


def _source_layout(meta: dict, src: Path, stored: dict) -> Layout:
    """The layout `qwen_jax.json` records: per rule its op, source keys, files, dtypes and shapes."""
    rules, tensors, files = [], {}, {}

    def add(source: dict, dtype: np.dtype | None = None) -> None:
        if dtype is None and source["dtype"] not in DTYPES:
            raise ExportError(f"{METADATA_FILE}: {source['key']} has unknown dtype {source['dtype']!r}")
        dtype = np.dtype(DTYPES[source["dtype"]]) if dtype is None else dtype
        tensors[source["key"]] = Tensor(source["key"], dtype, tuple(source["shape"]))
        files.setdefault(source["file"], []).append(source["key"])

    for record in meta["tensors"]:
        if record["op"] not in OPS:
            raise ExportError(f"{METADATA_FILE}: unknown layout op {record['op']!r}")
        for source in record["sources"]:
            add(source)
        rules.append(Rule(record["op"], tuple(s["key"] for s in record["sources"]),
                          tuple(tuple(s["shape"]) for s in record["sources"]),
                          tuple(t["path"] for t in record["targets"])))  # fmt: skip
        for target in record["targets"]:
            recorded, actual = tuple(target["shape"]), stored.get(target["path"], (None, None))[1]
            if actual is not None and actual != recorded:
                raise ExportError(f"{target['path']}: stored shape {list(actual)}, but its source had {list(recorded)}")
    mtp = meta.get("mtp") or {}
    if mtp.get("sources"):
        for source in mtp["sources"]:
            add(source)
    elif mtp.get("keys"):  # converted before sources were recorded: the stored dtype, the file the index names
        index = _read_index(src)
        fallback = min(meta.get("source_files") or ["model.safetensors"])
        for key in mtp["keys"]:
            dtype, shape = stored[_mtp_path(key)]
            add({"key": key, "file": index.get(key, fallback), "shape": shape}, dtype)
    _check_coverage(rules, list(mtp.get("keys") or []), stored)
    return Layout(rules, list(mtp.get("keys") or []), tensors, files, meta.get("source_files") or {},
                  index=bool(meta.get("source_index")))  # fmt: skip


def _official_layout(config: ModelConfig, stored: dict, max_shard_size: int) -> Layout:
    """The official releases' layout (see the module docstring), packed into shards in parameter order."""
    c = config.text
    experts = OFFICIAL_EXPERTS.get(c.model_type, "v5")
    if _ambiguous_experts(config):
        experts = "v5"
    p = config.text_prefix
    variants = set()  # the keys that select a variant in `checkpoint_rules`
    for i in range(c.num_hidden_layers):
        if c.model_type == "qwen3_next" and c.layer_types[i] == LINEAR_ATTENTION:
            variants.add(f"{p}layers.{i}.linear_attn.in_proj_qkvz.weight")
        if c.moe_layers[i] and experts != "per_expert":
            variants.add(f"{p}layers.{i}.mlp.experts.gate_up_proj")
    rules = checkpoint_rules(config, p, variants, "legacy" if experts == "legacy" else "v5")
    mtp_keys = sorted("mtp." + path[4:].replace("/", ".") for path in stored if path.startswith("mtp/"))
    _check_coverage(rules, mtp_keys, stored)
    tensors = {}
    for rule in rules:
        dtype = np.result_type(*(stored[t][0] for t in rule.targets))
        for key, shape in zip(rule.sources, rule.source_shapes):
            tensors[key] = Tensor(key, dtype, shape)
    for key in mtp_keys:
        dtype, shape = stored[_mtp_path(key)]
        tensors[key] = Tensor(key, dtype, shape)
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += tensor.nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    files = dict(zip(names, shards))
    return Layout(rules, mtp_keys, tensors, files, {n: {"format": "pt"} for n in names}, index=len(names) > 1)


def _ambiguous_experts(config: ModelConfig) -> bool:
    """Whether the official transposed expert layout would be misread on load (its shapes equal [E, 2I, H]'s)."""
    c = config.text
    legacy = OFFICIAL_EXPERTS.get(c.model_type) == "legacy"
    return legacy and c.hidden_size in (c.moe_intermediate_size, 2 * c.moe_intermediate_size)


def _check_coverage(rules: list[Rule], mtp_keys: list[str], stored: dict) -> None:
    """Every stored array is exported (as a rule's target or an MTP tensor), and everything exported is stored."""
    targets = {t for rule in rules for t in rule.targets} | {_mtp_path(k) for k in mtp_keys}
    missing = sorted(targets - set(stored))
    if missing:
        raise ExportError(f"the model directory has no {', '.join(missing[:3])}, which the layout needs")
    extra = sorted(set(stored) - targets)
    if extra:
        raise ExportError(f"stored parameters with no key in this layout: {', '.join(extra[:3])}")


def _invert(rule: Rule, tree: dict, config: ModelConfig) -> list[np.ndarray]:
    """The rule's source tensors from its stored targets."""
    targets = [np.asarray(_get(tree, path)) for path in rule.targets]
    try:
        return invert_rule(rule, targets, config.text)
    except ValueError:  # shapes a fine-tuned tree changed
        shapes = ", ".join(f"{p} {list(t.shape)}" for p, t in zip(rule.targets, targets))
        raise ExportError(f"{shapes} do not fit {rule.sources[0]} {list(rule.source_shapes[0])}") from None


def _copy_other_files(src: Path, dst: Path, log: Callable[[str], None]) -> None:
    """The non-weight files, unchanged, except that a quantization config goes (weights are never written FP8)."""
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in (METADATA_FILE, INDEX_FILE):
            continue
        if f.name == "config.json":
            config = json.loads(f.read_text())
            if config.pop("quantization_config", None) is not None:
                log("note: FP8 weights are written dequantized; quantization_config dropped from config.json")
                (dst / f.name).write_text(json.dumps(config, indent=2) + "\n")
                continue
        shutil.copy2(f, dst / f.name)


def _read_index(src: Path) -> dict[str, str]:
    """The weight map of the source's safetensors index (copied into the model directory), or {}."""
    file = src / INDEX_FILE
    if not file.exists():
        return {}
    try:
        return dict(json.loads(file.read_text())["weight_map"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ExportError(f"{file}: not a valid index (no weight_map)") from None


def _write_index(src: Path, dst: Path, plan: Layout) -> None:
    """The safetensors index: the source's own file where it still describes the output, else a new one."""
    weight_map = {key: name for name, keys in plan.files.items() for key in keys}
    if (src / INDEX_FILE).exists() and _read_index(src) == weight_map:
        shutil.copy2(src / INDEX_FILE, dst / INDEX_FILE)
        return
    total = sum(t.nbytes for t in plan.tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


class SafetensorsWriter:
    """Safetensors files whose headers are laid out up front (every key, dtype and shape known), then filled one
    tensor at a time, in any order, so that memory holds only the tensors in hand.

    files: file name -> its tensors, in header (and data) order; metadata: file name -> its `__metadata__`.
    """

    def __init__(self, directory: Path, files: dict[str, list[Tensor]], metadata: dict[str, dict[str, str]]):
        self.slots: dict[str, tuple[Path, int, Tensor]] = {}
        for name, tensors in files.items():
            header: dict = {"__metadata__": metadata[name]} if metadata.get(name) else {}
            offset = 0
            for t in tensors:
                header[t.key] = {
                    "dtype": self._name(t),
                    "shape": list(t.shape),
                    "data_offsets": [offset, offset + t.nbytes],
                }
                offset += t.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
            path = directory / name
            with path.open("wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(8 + len(raw) + offset)
            for t in tensors:
                self.slots[t.key] = (path, 8 + len(raw) + header[t.key]["data_offsets"][0], t)
        self.unwritten = set(self.slots)

    @staticmethod
    def _name(t: Tensor) -> str:
        if t.dtype not in SAFETENSORS_NAMES:
            raise ExportError(f"{t.key}: dtype {t.dtype} has no safetensors name")
        return SAFETENSORS_NAMES[t.dtype]

    def write(self, key: str, array: np.ndarray) -> None:
        path, offset, t = self.slots[key]
        if array.dtype != t.dtype or tuple(array.shape) != t.shape:
            raise ExportError(
                f"{key}: got {array.dtype} {list(array.shape)}, the layout says {t.dtype} {list(t.shape)}"
            )
        with path.open("r+b") as f:
            f.seek(offset)
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self.unwritten.discard(key)

    def close(self) -> None:
        if self.unwritten:
            raise ExportError(f"tensors never written: {', '.join(sorted(self.unwritten)[:3])}")
