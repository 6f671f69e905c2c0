"""Training: the data pipeline (`qwen_jax.train.data`)."""
