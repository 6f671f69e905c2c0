"""The training data pipeline, on grain: documents -> tokens and target mask -> pieces of at most T tokens ->
rows of T packed with whole pieces -> batches `[batch, T]`.

Sources (`load_documents` reads both kinds, by file extension):

- plain text (`text_documents`): each `.txt` file is one document, or, with `delimiter` (a regular expression, e.g.
  `r"\\n\\s*\\n"` for runs of blank lines), the parts of the file between its matches are. Whitespace-only documents
  are dropped. Directories are searched recursively, in sorted path order.
- chat (`chat_documents`): JSONL files with one conversation per line,
  `{"messages": [{"role": ..., "content": ...}, ...], "images": ["path", ...]}`. A message's content may be a list of
  parts, `{"type": "text", "text": ...}` or `{"type": "image"}`; each image part takes its own `"image"` path if it
  has one, else the next path of `images` (optional). Relative paths are taken from the JSONL file's directory.

Tokenization (`tokenize_document`):

- text: the text's tokens, then `<|endoftext|>`; every token is a target.
- chat: the conversation rendered by the tokenizer's chat template exactly as `qwen_jax.chat` renders it (no
  generation prompt), tokenized. Target mask 1 exactly on what the assistant writes: each assistant turn after its
  role header `<|im_start|>assistant\\n`, through its `<|im_end|>` (thinking and tool calls included; system, user and
  tool turns and the role headers excluded). The spans are character ranges of the rendered text, mapped to tokens
  through the tokenizer's offsets: a token is masked in when it overlaps a span, which is how `transformers`'
  `apply_chat_template(..., return_assistant_tokens_mask=True)` maps a template's `{% generation %}` spans.
  Conversations with images need `images` (`qwen_jax.train.images.ImageInputs`, a vision-language model): their
  placeholders are expanded to one token per merged patch and the documents carry pixel patches and MRoPE
  positions (see that module).

Packing (`packed_batches`): each document is cut into consecutive pieces of at most T tokens (a longer document
gives several pieces, each its own segment; a conversation with images must fit in one), and pieces are packed
first-fit into rows of T (and of `patches_per_row` image patches, with images)
(`grain.experimental.FirstFitPackIterDataset`), so no segment mixes two documents. Each batch is a dict of numpy
arrays `[batch, T]`:

| key | dtype | value |
|---|---|---|
| `input_ids` | int32 | the tokens, 0 on padding |
| `segment_ids` | int32 | 1, 2, ... for the segments of the row in order, 0 on padding |
| `positions` | int32 | 0, 1, ... from each segment's start, 0 on padding |
| `targets` | int32 | `input_ids[t + 1]` when position t + 1 is in the same segment, else 0 |
| `loss_mask` | float32 | the target mask of `targets[t]` (so for chat: 1 where the next token is the assistant's), 0 where `targets` is 0 by the rule above (each segment's last token, padding) |

With `images`, rows also have `mrope_positions` int32 `[T, 3]` (the 3D positions, restarting per segment),
`pixel_values` float32 `[P, C*T*P*P]` (P = `patches_per_row`; the row's image patches in order, then zeros) and the
vision tower's layout of those patches (`qwen_jax.train.images.LAYOUT_KEYS`).

Order and resumption: documents are shuffled with `seed` (a new order each epoch), and everything after is
deterministic, so a pipeline built with the same arguments yields the same batches; its iterator's `get_state()`
(a small JSON-serializable dict) restored with `set_state()` into a fresh iterator resumes at exactly the next batch.

Held-out data (`split_documents`): document i is held out when a 64-bit BLAKE2b hash of its index, as a fraction of
2^64, is below the held-out fraction; the split depends only on the index and the fraction.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from qwen_jax.chat import ChatTokenizer
from qwen_jax.errors import InputError
from qwen_jax.train.images import LAYOUT_KEYS, ImageInputs

DOCUMENT_END = "<|endoftext|>"
TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
ASSISTANT_HEADER = TURN_START + "assistant\n"
BATCH_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask")

VISION_KEYS = ("mrope_positions", "pixel_values", *LAYOUT_KEYS)


# ---------------------------------------------------------------------------------------------------- sources


def _files(paths: Sequence[str | Path], suffixes: tuple[str, ...]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.suffix in suffixes and f.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None


def text_documents(paths: Sequence[str | Path], delimiter: str | None = None) -> list[dict]:
    """`{"text", "source"}` documents from `.txt` files (directories: all `.txt` files below, sorted): one per file,
    or split at each match of the regular expression `delimiter`; whitespace-only documents are dropped."""
    try:
        pattern = re.compile(delimiter) if delimiter is not None else None
    except re.error as e:
        raise InputError(f"delimiter {delimiter!r}: not a regular expression ({e})") from None
    documents = []
    for path in _files(paths, (".txt",)):
        parts = pattern.split(_read_text(path)) if pattern else [_read_text(path)]
        documents += [{"text": t, "source": f"{path}#{k}"} for k, t in enumerate(parts) if t and not t.isspace()]
    return documents


def _strings(messages: list[dict]) -> list[str]:
    """Every text of a conversation that the template renders verbatim."""
    texts = []
    for m in messages:
        content = m.get("content")
        parts = content if isinstance(content, list) else [{"text": content}]
        texts += [p.get("text") for p in parts if isinstance(p, dict)] + [m.get("reasoning_content")]
    return [t for t in texts if isinstance(t, str)]


def _check_conversation(line: Any, where: str) -> None:
    if not isinstance(line, dict) or not isinstance(line.get("messages"), list) or not line["messages"]:
        raise InputError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
    for m in line["messages"]:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InputError(f"{where}: each message needs a string 'role'")
        if not isinstance(m.get("content", ""), (str, list, type(None))):
            raise InputError(f"{where}: a message's 'content' must be a string or a list of parts")
    images = line.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise InputError(f"{where}: 'images' must be a list of paths")
    if any(TURN_START in t or TURN_END in t for t in _strings(line["messages"])):
        raise InputError(f"{where}: a message contains {TURN_START} or {TURN_END}")


def _resolve_parts(message: dict, base: Path) -> dict:
    """The message with its image parts' own paths taken from `base`."""
    if not isinstance(message.get("content"), list):
        return message
    parts = [dict(p, image=str(base / p["image"])) if isinstance(p, dict) and isinstance(p.get("image"), str) else p
             for p in message["content"]]  # fmt: skip
    return dict(message, content=parts)


def chat_documents(paths: Sequence[str | Path]) -> list[dict]:
    """`{"messages", "images", "source"}` documents, one per non-empty line of JSONL files (directories: all `.jsonl`
    files below, sorted). Image paths are resolved against the JSONL file's directory."""
    documents = []
    for path in _files(paths, (".jsonl",)):
        for number, text in enumerate(_read_text(path).splitlines(), 1):
            if not text.strip():
                continue
            where = f"{path}:{number}"
            try:
                line = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg})") from None
            _check_conversation(line, where)
            images = [str(path.parent / p) for p in line.get("images", [])]
            messages = [_resolve_parts(m, path.parent) for m in line["messages"]]
            documents.append({"messages": messages, "images": images, "source": where})
    return documents


def load_documents(paths: Sequence[str | Path], delimiter: str | None = None) -> list[dict]:
    """Text documents from `.txt` files and conversations from `.jsonl` files (directories: both kinds below),
    text first; see `text_documents` and `chat_documents`."""
    files = _files(paths, (".txt", ".jsonl"))
    chats = [f for f in files if f.suffix == ".jsonl"]
    documents = text_documents([f for f in files if f.suffix != ".jsonl"], delimiter) + chat_documents(chats)
    if not documents:
        raise InputError(f"no documents in {', '.join(map(str, paths))}")
    return documents


def is_held_out(index: int, fraction: float) -> bool:
    """Whether document `index` belongs to the held-out split (a fixed hash of the index below `fraction`)."""
    digest = hashlib.blake2b(str(index).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def split_documents(documents: Sequence[dict], held_out_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out) documents, each in its original order; see `is_held_out`."""
    if not 0 <= held_out_fraction < 1:
        raise InputError(f"held-out fraction {held_out_fraction}: must be in [0, 1)")
    held = [is_held_out(i, held_out_fraction) for i in range(len(documents))]
    return [d for d, h in zip(documents, held) if not h], [d for d, h in zip(documents, held) if h]


# ---------------------------------------------------------------------------------------------------- tokenization


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character ranges `[start, end)` of what the assistant writes in a rendered conversation: from after each
    `<|im_start|>assistant\\n` through the `<|im_end|>` that closes it (to the end of the text if none does)."""
    spans = []
    start = text.find(ASSISTANT_HEADER)
    while start >= 0:
        start += len(ASSISTANT_HEADER)
        close = text.find(TURN_END, start)
        end = len(text) if close < 0 else close + len(TURN_END)
        spans.append((start, end))
        start = text.find(ASSISTANT_HEADER, end)
    return spans


def spans_to_token_mask(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """int32 `[tokens]`: 1 where a token's character range `offsets[i] = (start, end)` overlaps one of `spans`."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:
        mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return mask.astype(np.int32)


def image_paths(document: dict) -> list[str]:
    """The conversation's image paths in the order its image parts appear (see the module docstring)."""
    listed = iter(document.get("images", []))
    paths = []
    for message in document["messages"]:
        for part in message.get("content") if isinstance(message.get("content"), list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "video":
                raise InputError(f"{document.get('source', 'a conversation')}: videos are not supported in training")
            if kind == "image":
                path = part.get("image") or next(listed, None)
                if path is None:
                    raise InputError(f"{document.get('source', 'a conversation')}: more image parts than images")
                paths.append(path)
    if next(listed, None) is not None:
        raise InputError(f"{document.get('source', 'a conversation')}: more images than image parts")
    return paths


def _check_images(document: dict, images: ImageInputs | None) -> None:
    if "messages" in document and image_paths(document) and images is None:
        raise InputError(
            f"{document.get('source', 'a conversation')}: has images, but the model has no vision tower to train on "
            "them with"
        )


def tokenize_document(tokenizer: ChatTokenizer, document: dict, images: ImageInputs | None = None) -> dict:
    """`{"tokens": int32 [L], "mask": int32 [L]}` of a text document (`mask` all 1) or a conversation (`mask` 1 on
    the assistant's tokens), plus, with `images`, the document's `mrope`, `patches` and `patch_coords`
    (`ImageInputs.features`); see the module docstring."""
    pixels = grids = None
    if "text" in document:
        end = tokenizer.token_id(DOCUMENT_END)
        if end is None:
            raise InputError(f"the tokenizer has no {DOCUMENT_END} token to end text documents with")
        tokens = np.array([*tokenizer.encode(document["text"]), end], dtype=np.int32)
        out = {"tokens": tokens, "mask": np.ones_like(tokens)}
    else:
        _check_images(document, images)
        text = tokenizer.render(document["messages"], add_generation_prompt=False)
        if images is not None:
            text, pixels, grids = images.encode(text, image_paths(document))
        encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
        mask = spans_to_token_mask(np.array(encoding.offsets), assistant_spans(text))
        out = {"tokens": np.array(encoding.ids, dtype=np.int32), "mask": mask}
    if images is not None:
        if pixels is None:
            pixels, grids = images.encode("", [])[1:]
        out.update(images.features(out["tokens"], pixels, grids))
    return out


# ---------------------------------------------------------------------------------------------------- packing


class _Pieces(grain.experimental.FlatMapTransform):
    """A tokenized document -> its consecutive pieces of at most `seq_len` tokens (one piece for a document with
    image patches, which must fit); each piece's MRoPE positions restart at 0."""

    max_fan_out = 2**31  # only MapDataset flat maps check it; this one runs on an IterDataset

    def __init__(self, seq_len: int, patches_per_row: int = 0):
        self.seq_len, self.patches_per_row = seq_len, patches_per_row

    def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        n = len(element["tokens"])
        if "patches" not in element:
            return [{k: v[i : i + self.seq_len] for k, v in element.items()} for i in range(0, n, self.seq_len)]
        if len(element["patches"]):
            if n > self.seq_len or len(element["patches"]) > self.patches_per_row:
                raise InputError(
                    f"a conversation with images is {n} tokens and {len(element['patches'])} patches, more than "
                    f"seq_len {self.seq_len} or image_patches_per_row {self.patches_per_row}"
                )
            return [element]
        pieces = []
        for i in range(0, n, self.seq_len):
            piece = {k: element[k][i : i + self.seq_len] for k in ("tokens", "mask", "mrope")}
            piece["mrope"] = piece["mrope"] - piece["mrope"][:1]
            pieces.append(dict(piece, patches=element["patches"], patch_coords=element["patch_coords"]))
        return pieces


def shift_targets(
    input_ids: np.ndarray, segment_ids: np.ndarray, token_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(`targets` int32, `loss_mask` float32), both `[..., T]`, from packed `input_ids`, `segment_ids` and the
    per-token target mask `[..., T]`: the next token and its mask where it is in the same (non-padding) segment,
    else 0."""
    same = np.zeros(segment_ids.shape, dtype=bool)
    same[..., :-1] = (segment_ids[..., 1:] == segment_ids[..., :-1]) & (segment_ids[..., :-1] != 0)
    targets = np.zeros_like(input_ids, dtype=np.int32)
    targets[..., :-1] = input_ids[..., 1:]
    loss_mask = np.zeros(token_mask.shape, dtype=np.float32)
    loss_mask[..., :-1] = token_mask[..., 1:]
    return np.where(same, targets, 0).astype(np.int32), np.where(same, loss_mask, 0).astype(np.float32)


def _finish_row(row: dict[str, np.ndarray], images: ImageInputs | None = None) -> dict[str, np.ndarray]:
    """A row packed by grain (`tokens`, `tokens_segment_ids`, `tokens_positions`, `mask`, ...) -> `BATCH_KEYS`
    (and `VISION_KEYS` with images)."""
    input_ids = row["tokens"].astype(np.int32)
    segment_ids = row["tokens_segment_ids"].astype(np.int32)
    targets, loss_mask = shift_targets(input_ids, segment_ids, row["mask"])
    positions = np.where(segment_ids != 0, row["tokens_positions"], 0).astype(np.int32)
    out = {"input_ids": input_ids, "segment_ids": segment_ids, "positions": positions, "targets": targets,
           "loss_mask": loss_mask}  # fmt: skip
    if images is not None:
        out["mrope_positions"] = np.where(segment_ids[:, None] != 0, row["mrope"], 0).astype(np.int32)
        out["pixel_values"] = row["patches"].astype(np.float32)
        out.update(images.row_layout(row["patch_coords"], row["patches_segment_ids"]))
    return out


def _stack(rows: Sequence[dict[str, np.ndarray]], batch_size: int) -> dict[str, np.ndarray]:
    """Rows -> a batch `[batch_size, ...]`; a short last batch is filled with padding rows (all 0)."""
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    fill = batch_size - len(rows)
    return {k: np.concatenate([v, np.zeros((fill, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def _lengths(seq_len: int, images: ImageInputs | None) -> dict[str, int]:
    lengths = {"tokens": seq_len, "mask": seq_len}
    if images is not None:
        lengths.update(mrope=seq_len, patches=images.patches_per_row, patch_coords=images.patches_per_row)
    return lengths


def packed_batches(
    documents: Sequence[dict],
    tokenizer: ChatTokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    packing_bins: int | None = None,
    images: ImageInputs | None = None,
) -> grain.IterDataset:
    """A grain dataset of packed batches: dicts of numpy arrays `[batch_size, seq_len]` with `BATCH_KEYS` (see the
    module docstring).

    documents: from `load_documents` / `split_documents`. shuffle: in a new order each epoch, from `seed`.
    num_epochs: None repeats forever; otherwise the last batch is completed with padding rows (loss_mask 0).
    packing_bins: rows filled at once by the first-fit packer (default `max(batch_size, 16)`): more bins, less
    padding. images: for conversations with images (a vision-language model); each row then also holds
    `images.patches_per_row` patches. `iter()` of the result has `get_state()` / `set_state()`.
    """
    if not documents:
        raise InputError("no documents to train on")
    if seq_len < 2 or batch_size < 1:
        raise InputError(f"seq_len {seq_len} must be >= 2 and batch_size {batch_size} >= 1")
    if num_epochs is not None and num_epochs < 1:
        raise InputError(f"num_epochs {num_epochs}: must be >= 1 (or None: forever)")
    if any("text" in d for d in documents) and tokenizer.token_id(DOCUMENT_END) is None:
        raise InputError(f"the tokenizer has no {DOCUMENT_END} token to end text documents with")
    for document in documents:
        _check_images(document, images)
    dataset = grain.MapDataset.source(list(documents))
    if shuffle:
        dataset = dataset.shuffle(seed)
    dataset = dataset.repeat(num_epochs).map(functools.partial(tokenize_document, tokenizer, images=images))
    pieces = _Pieces(seq_len, images.patches_per_row if images else 0)
    rows = grain.experimental.FlatMapIterDataset(
        dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=32)), pieces
    )
    rows = grain.experimental.FirstFitPackIterDataset(
        rows,
        length_struct=_lengths(seq_len, images),
        num_packing_bins=packing_bins or max(batch_size, 16),
        shuffle_bins=False,
    ).map(functools.partial(_finish_row, images=images))
    return rows.batch(batch_size, batch_fn=functools.partial(_stack, batch_size=batch_size))
