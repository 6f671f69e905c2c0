"""Logits processors and token sampling, with the reference's (`transformers`) meanings.

Order, as `generate` applies them: repetition penalty (over prompt and output), presence penalty (over the output),
then temperature, top-k, top-p, min-p, then a categorical draw (or argmax when `temperature == 0`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings. `temperature == 0` is greedy decoding."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0  # 0: off

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_penalties(logits: jax.Array, seen: jax.Array, generated: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """logits `[batch, vocab]`; seen `[batch, vocab]` bool: token in prompt or output; generated: in output only.

    Repetition penalty as `RepetitionPenaltyLogitsProcessor`: a seen token's logit is divided by the penalty if
    positive, multiplied if negative. Presence penalty: subtracted once from every token already generated.
    """
    if cfg.repetition_penalty != 1.0:
        penalized = jnp.where(logits < 0, logits * cfg.repetition_penalty, logits / cfg.repetition_penalty)
        logits = jnp.where(seen, penalized, logits)
    if cfg.presence_penalty:
        logits = logits - cfg.presence_penalty * generated.astype(logits.dtype)
    return logits


def warp(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Temperature, then top-k, top-p and min-p filtering (removed tokens get -inf). logits `[batch, vocab]`."""
    logits = logits.astype(jnp.float32)
    if cfg.temperature not in (0.0, 1.0):
        logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if cfg.top_p < 1.0:
        # As TopPLogitsWarper: ascending sort, drop the tokens whose cumulative probability is <= 1 - top_p,
        # always keeping the most probable one.
        order = jnp.argsort(logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = (cumulative <= 1 - cfg.top_p).at[..., -1].set(False)
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, NEG_INF, logits)
    if cfg.min_p > 0.0:
        probs = jax.nn.softmax(logits, axis=-1)
        threshold = cfg.min_p * jnp.max(probs, axis=-1, keepdims=True)
        logits = jnp.where(probs < threshold, NEG_INF, logits)
    return logits


def sample(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Next tokens `[batch]` from processed logits `[batch, vocab]`."""
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, warp(logits, cfg), axis=-1).astype(jnp.int32)
