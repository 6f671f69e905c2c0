"""Training losses: a chunked next-token cross-entropy that never materializes the `[tokens, vocab]` logits, and
the MoE load-balancing auxiliary loss exactly as the reference computes it.

The cross-entropy walks the flattened tokens in chunks of `chunk_size` (`lax.map`); each chunk's logits
`[chunk, vocab]` are float32, and the chunk is rematerialized, so the backward pass recomputes its logits instead of
keeping them: memory is `chunk x vocab` whatever the sequence length (with Qwen3.5's 248k vocabulary a full
`[batch, seq, vocab]` float32 tensor would be gigabytes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(hidden: jax.Array, weights: jax.Array, targets: jax.Array, chunk_size: int = 1024) -> jax.Array:
    """Per-token cross-entropy `[batch, seq]` float32: `logsumexp(logits) - logits[target]` with
    `logits = hidden @ weights` in float32.

    hidden `[batch, seq, hidden]` (final-normed, any float dtype); weights `[hidden, vocab]` (`output_weights`);
    targets `[batch, seq]` int. Masking is the caller's (multiply by the loss mask)."""
    batch, seq, width = hidden.shape
    n = batch * seq
    chunk = max(1, min(chunk_size, n))
    pad = (-n) % chunk
    flat_hidden = jnp.pad(hidden.reshape(n, width), ((0, pad), (0, 0))).reshape(-1, chunk, width)
    flat_targets = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, pad)).reshape(-1, chunk)

    @jax.checkpoint
    def one_chunk(xs: tuple[jax.Array, jax.Array]) -> jax.Array:
        h, t = xs
        logits = jnp.dot(h, weights.astype(h.dtype), preferred_element_type=jnp.float32)  # [chunk, vocab]
        target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        return jax.nn.logsumexp(logits, axis=-1) - target_logit

    losses = jax.lax.map(one_chunk, (flat_hidden, flat_targets))
    return losses.reshape(-1)[:n].reshape(batch, seq)


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    """`sum(values * mask)` in float32 (values, mask `[batch, seq]`)."""
    return jnp.sum(values.astype(jnp.float32) * mask.astype(jnp.float32))


def load_balancing_loss(router_logits: jax.Array, top_k: int, token_mask: jax.Array | None = None) -> jax.Array:
    """The Switch-Transformer auxiliary loss as `transformers`' `load_balancing_loss_func` computes it for Qwen3.5-MoE
    and Qwen3-Next: `E * sum_e f_e * P_e`, where over all MoE layers and the unmasked tokens together `f_e` is the
    mean number of top-k assignments to expert e and `P_e` the mean softmax probability of e.

    router_logits `[moe_layers, tokens, experts]` float32 (`DecoderOutputs.router_logits`, tokens = batch * seq);
    token_mask `[tokens]` (1 = a real token; the reference's attention mask) or None for all tokens. The top-k
    counts carry no gradient; the probabilities do."""
    layers, tokens, experts = router_logits.shape
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, selected = jax.lax.top_k(probs, top_k)  # [layers, tokens, k]
    counts = jnp.sum(jax.nn.one_hot(selected, experts, dtype=jnp.float32), axis=-2)  # [layers, tokens, experts]
    mask = jnp.ones((tokens,), jnp.float32) if token_mask is None else token_mask.reshape(tokens).astype(jnp.float32)
    rows = layers * jnp.sum(mask)
    tokens_per_expert = jnp.einsum("lte,t->e", counts, mask) / rows
    prob_per_expert = jnp.einsum("lte,t->e", probs, mask) / rows
    return experts * jnp.sum(tokens_per_expert * prob_per_expert)
