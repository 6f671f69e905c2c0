"""Held-out evaluation: a model's mean next-token loss over held-out documents, and the unigram baseline on the
same targets.

Both read the held-out documents through the training pipeline (`packed_batches`, in order, one epoch), so they
score exactly the same targets: every token that follows another in the same piece of a document, with its loss
mask. The unigram baseline predicts each target with the token frequencies of the training documents (every token
of every training document, add-one smoothed over the vocabulary): the loss a model that ignores context can reach.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.chat import ChatTokenizer
from qwen_jax.config import TextConfig
from qwen_jax.train.data import packed_batches, tokenize_document
from qwen_jax.train.images import ImageInputs
from qwen_jax.train.trainer import LossSettings, batch_objective


def held_out_batches(
    documents: Sequence[dict],
    tokenizer: ChatTokenizer,
    seq_len: int,
    batch_size: int,
    images: ImageInputs | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The held-out documents as packed batches `[batch_size, seq_len]`, in order, once."""
    return iter(packed_batches(documents, tokenizer, seq_len=seq_len, batch_size=batch_size, shuffle=False,
                               num_epochs=1, images=images))  # fmt: skip


@functools.partial(jax.jit, static_argnames=("config", "settings"))
def _batch_loss_sum(
    params: Any, config: TextConfig, batch: dict, settings: LossSettings
) -> tuple[jax.Array, jax.Array]:
    _, (ce_sum, _) = batch_objective(params, config, batch, settings, jnp.float32(1.0), 1)
    return ce_sum, jnp.sum(batch["loss_mask"])


def held_out_loss(
    params: Any,
    config: TextConfig,
    documents: Sequence[dict],
    tokenizer: ChatTokenizer,
    seq_len: int,
    batch_size: int = 8,
    loss_chunk: int = 1024,
    images: ImageInputs | None = None,
) -> tuple[float, int]:
    """(mean cross-entropy in nats per target token, number of target tokens) over `documents` (with images:
    `images` of a vision-language model)."""
    settings = LossSettings(loss_chunk=loss_chunk, vision=images and images.vision,
                            image_token_id=images.image_token_id if images else -1)  # fmt: skip
    total, count = 0.0, 0.0
    for batch in held_out_batches(documents, tokenizer, seq_len, batch_size, images):
        loss_sum, n = _batch_loss_sum(params, config, {k: jnp.asarray(v) for k, v in batch.items()}, settings)
        total, count = total + float(loss_sum), count + float(n)
    return total / max(count, 1.0), int(count)


def unigram_baseline(
    train_documents: Sequence[dict],
    held_out_documents: Sequence[dict],
    tokenizer: ChatTokenizer,
    seq_len: int,
    vocab_size: int,
    images: ImageInputs | None = None,
) -> float:
    """Mean cross-entropy (nats per target token) on the held-out targets of the add-one-smoothed unigram
    distribution of the training documents' tokens."""
    counts = np.ones(vocab_size, np.float64)
    for document in train_documents:
        np.add.at(counts, tokenize_document(tokenizer, document, images)["tokens"], 1)
    log_probs = np.log(counts / counts.sum())
    total, count = 0.0, 0.0
    for batch in held_out_batches(held_out_documents, tokenizer, seq_len, 8, images):
        total -= float(np.sum(log_probs[batch["targets"]] * batch["loss_mask"]))
        count += float(np.sum(batch["loss_mask"]))
    return total / max(count, 1.0)
