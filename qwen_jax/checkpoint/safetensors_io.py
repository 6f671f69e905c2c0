"""Read-only access to safetensors files (one file, or shards listed by `model.safetensors.index.json`).

A small reader of the format itself (8-byte header length, JSON header, raw little-endian data), so bfloat16 arrives
as `ml_dtypes.bfloat16` and a truncated or malformed file is reported by name before any tensor is read. Each tensor
is read into its own buffer (no memory map), so memory holds only the tensors in use, whatever the file's size.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from qwen_jax.errors import InputError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}  # fmt: skip
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsError(InputError):
    """A safetensors file or index that cannot be read."""


class _File:
    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path.name}: truncated (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise SafetensorsError(f"{path.name}: truncated (header of {n} bytes, file of {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise SafetensorsError(f"{path.name}: corrupt header") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        self.data_start = 8 + n
        data_size = size - self.data_start
        for key, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise SafetensorsError(f"{path.name}: tensor {key} has unsupported dtype {e.get('dtype')!r}")
            begin, end = e["data_offsets"]
            itemsize = np.dtype(DTYPES[e["dtype"]]).itemsize
            if end - begin != int(np.prod(e["shape"], dtype=np.int64)) * itemsize:
                raise SafetensorsError(f"{path.name}: tensor {key} has data_offsets that disagree with its shape")
            if end > data_size:
                raise SafetensorsError(
                    f"{path.name}: truncated (tensor {key} ends at byte {end} of the data, which has {data_size})"
                )

    def read(self, key: str) -> np.ndarray:
        e = self.entries[key]
        begin, end = e["data_offsets"]
        dtype = np.dtype(DTYPES[e["dtype"]])
        count = (end - begin) // dtype.itemsize
        array = np.fromfile(self.path, dtype=dtype, count=count, offset=self.data_start + begin)
        if array.size != count:
            raise SafetensorsError(f"{self.path.name}: truncated while reading {key}")
        return array.reshape(e["shape"])


class SafetensorsCheckpoint:
    """All tensors of a checkpoint directory, by key. `info(key)` is (dtype name, shape); `read(key)` an ndarray."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SafetensorsError(f"{INDEX_FILE}: not a valid index (no weight_map)") from None
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (directory / n).exists()]
            if missing:
                raise SafetensorsError(f"{INDEX_FILE} names missing shard(s): {', '.join(missing)}")
        else:
            weight_map = None
            names = sorted(p.name for p in directory.glob("*.safetensors"))
        if not names:
            raise SafetensorsError(f"{directory}: no *.safetensors files")
        self.files = {name: _File(directory / name) for name in names}
        self.key_file: dict[str, str] = {}
        for name, f in self.files.items():
            for key in f.entries:
                if key in self.key_file:
                    raise SafetensorsError(f"tensor {key} appears in both {self.key_file[key]} and {name}")
                self.key_file[key] = name
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.key_file.get(key) != name:
                    raise SafetensorsError(f"{INDEX_FILE} places {key} in {name}, which does not hold it")
        self.index_file = INDEX_FILE if weight_map is not None else None

    def keys(self) -> list[str]:
        return list(self.key_file)

    def info(self, key: str) -> tuple[str, tuple[int, ...]]:
        e = self.files[self.key_file[key]].entries[key]
        return e["dtype"], tuple(e["shape"])

    def read(self, key: str) -> np.ndarray:
        return self.files[self.key_file[key]].read(key)

    def nbytes(self, key: str) -> int:
        begin, end = self.files[self.key_file[key]].entries[key]["data_offsets"]
        return end - begin
