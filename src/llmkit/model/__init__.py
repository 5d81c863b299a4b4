"""Model architectures. `build_model` is the one place a config turns into a module."""

from llmkit.config import ModelConfig
from llmkit.model.decoder import DecoderLM, DecoderOutput
from llmkit.model.layers import KVCache


def build_model(cfg: ModelConfig) -> DecoderLM:
    return DecoderLM(cfg)


__all__ = ["DecoderLM", "DecoderOutput", "KVCache", "ModelConfig", "build_model"]
