"""Model architectures. `build_model` is the one place a config turns into a module."""

from llmkit.config import ModelConfig
from llmkit.model.decoder import DecoderLM, DecoderOutput
from llmkit.model.encoder import EncoderLM, EncoderOutput
from llmkit.model.layers import KVCache


def build_model(cfg: ModelConfig) -> DecoderLM | EncoderLM:
    return EncoderLM(cfg) if cfg.arch == "bert" else DecoderLM(cfg)


__all__ = ["DecoderLM", "DecoderOutput", "EncoderLM", "EncoderOutput", "KVCache", "ModelConfig", "build_model"]
