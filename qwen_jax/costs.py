"""What one token costs a Qwen3.5 / Qwen3-Next / Qwen3-VL decoder, computed from its config alone: the parameters
it touches, the weight bytes a batch-1 decode step reads, and the useful FLOPs of a prefill.

A token touches every weight except the experts it is not routed to (it uses `num_experts_per_tok` of
`num_experts` in each MoE layer) and all embedding rows but its own; the LM head is a full `[hidden, vocab]` matmul
per position whose logits are computed (tied or not).
"""

from __future__ import annotations

from typing import NamedTuple

from qwen_jax.config import LINEAR_ATTENTION, TextConfig


class TokenParameters(NamedTuple):
    """Parameter counts: `total` in the model; `active` touched by one token (embedding row and LM head included);
    `lm_head` the part of `active` that is the LM head; `float32` the part of `active` kept float32 whatever the
    weight dtype (norm weights, `A_log`, `dt_bias`)."""

    total: int
    active: int
    lm_head: int
    float32: int


def _attention(c: TextConfig) -> tuple[int, int]:
    """(matrix parameters, norm parameters) of one gated full-attention layer."""
    q_out = c.num_attention_heads * c.head_dim * (2 if c.attention_output_gate else 1)  # query, then its gate
    kv_out = c.num_key_value_heads * c.head_dim
    o_in = c.num_attention_heads * c.head_dim
    matrices = c.hidden_size * (q_out + 2 * kv_out) + o_in * c.hidden_size
    if c.attention_bias:
        matrices += q_out + 2 * kv_out + c.hidden_size
    return matrices, 2 * c.head_dim  # q_norm, k_norm


def _delta_net(c: TextConfig) -> tuple[int, int]:
    """(other parameters, float32 parameters) of one Gated DeltaNet layer."""
    heads = c.linear_num_value_heads
    projections = c.hidden_size * (c.conv_dim + c.value_dim + 2 * heads) + c.value_dim * c.hidden_size
    conv = c.linear_conv_kernel_dim * c.conv_dim
    return projections + conv, 2 * heads + c.linear_value_head_dim  # A_log, dt_bias, the gated norm


def _ffn(c: TextConfig, moe: bool) -> tuple[int, int]:
    """(total, active per token) parameters of one feed-forward block."""
    if not moe:
        dense = 3 * c.hidden_size * c.intermediate_size
        return dense, dense
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    router = c.hidden_size * c.num_experts
    shared = 3 * c.hidden_size * c.shared_expert_intermediate_size
    shared += c.hidden_size if c.shared_expert_intermediate_size else 0  # shared_expert_gate
    fixed = router + shared
    return fixed + c.num_experts * expert, fixed + c.num_experts_per_tok * expert


def token_parameters(c: TextConfig) -> TokenParameters:
    """Count the parameters of the decoder `c` describes, and those one token touches."""
    total = active = float32 = 0
    for kind, moe in zip(c.layer_types, c.moe_layers):
        mixer, mixer_f32 = _delta_net(c) if kind == LINEAR_ATTENTION else _attention(c)
        ffn_total, ffn_active = _ffn(c, moe)
        norms = 2 * c.hidden_size + mixer_f32  # input and post-attention norms
        total += mixer + ffn_total + norms
        active += mixer + ffn_active + norms
        float32 += norms
    table = c.vocab_size * c.hidden_size
    total += c.hidden_size + table * (1 if c.tie_word_embeddings else 2)  # final norm, embedding, LM head
    active += c.hidden_size + c.hidden_size + table  # final norm, one embedding row, the LM head
    float32 += c.hidden_size
    return TokenParameters(total, active, table, float32)


def decode_weight_bytes(c: TextConfig, weight_bytes: int) -> int:
    """Weight bytes one batch-1 decode step reads, with weights of `weight_bytes` each (4: float32, 2: bfloat16);
    norm weights, `A_log` and `dt_bias` are float32 always. Caches and activations are not counted."""
    p = token_parameters(c)
    return (p.active - p.float32) * weight_bytes + p.float32 * 4


def mixer_flops(c: TextConfig, seq: int) -> float:
    """Useful FLOPs of the token mixers over a causal prefill of `seq` tokens (one row), beyond the projections.

    Attention: QK^T and PV over the causal half, `2 * 2 * heads * head_dim` per (query, key <= query) pair. Delta
    rule: per token and value head, the two state reads `S^T k` and `S^T q`, the rank-1 update and the decay,
    `7 * key_dim * value_dim` (the recurrent form's count; the chunked form does more to gain parallelism).
    """
    attention_layers = sum(kind != LINEAR_ATTENTION for kind in c.layer_types)
    delta_layers = len(c.layer_types) - attention_layers
    pairs = seq * (seq + 1) / 2
    attention = 4.0 * c.num_attention_heads * c.head_dim * pairs
    delta = 7.0 * c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * seq
    return attention_layers * attention + delta_layers * delta


def prefill_flops(c: TextConfig, seq: int, logit_positions: int) -> float:
    """Useful FLOPs of a prefill of `seq` tokens (one row) that computes logits at `logit_positions` of them:
    2 per active parameter per token (the LM head only where logits are computed) plus the mixers' FLOPs."""
    p = token_parameters(c)
    return 2.0 * ((p.active - p.lm_head) * seq + p.lm_head * logit_positions) + mixer_flops(c, seq)
