"""Checkpoints: reading Hugging Face safetensors, the key/layout mapping, and this library's on-disk model format."""
