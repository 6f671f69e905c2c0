"""Hand-written accelerator kernels (Pallas), each selected by the layer that owns the XLA form of its computation."""

from qwen_jax.kernels.delta_rule_tpu import chunked_gated_delta_rule_pallas

__all__ = ["chunked_gated_delta_rule_pallas"]
