"""Inference: the one model loader, generation with a KV cache, chat, evaluation, the Python API.

Never imports the training package."""
