"""Model architectures. `build_model` is the one place a config turns into a module (the architecture registry)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError
from llmkit.model.decoder import DecoderLM, DecoderOutput
from llmkit.model.encoder import EncoderLM, EncoderOutput
from llmkit.model.layers import KVCache
from llmkit.model.lstm import LSTMLM
from llmkit.model.seq2seq import Seq2SeqLM, Seq2SeqOutput
from llmkit.model.weights import load_into

ARCHITECTURES = {"gpt2": DecoderLM, "llama": DecoderLM, "bert": EncoderLM, "mbart": Seq2SeqLM, "lstm": LSTMLM}
# Parts of an EncoderLM a checkpoint may leave out (a sentence-embedding BERT has no pre-training heads).
OPTIONAL_HEADS = ("mlm.", "nsp.", "pooler.")


def build_model(cfg: ModelConfig) -> DecoderLM | EncoderLM | Seq2SeqLM:
    if cfg.autosize:  # its shape is not decided yet: only `llmkit pretrain` measures and decides it
        raise ConfigError("model.preset auto is sized by `llmkit pretrain` under train.max_minutes; here name a "
                          "fixed preset (e.g. tiny) or a shape")
    return ARCHITECTURES[cfg.arch](cfg)


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Make torch.nn.init a no-op while a model is built whose weights are loaded right after (135 M random
    normals cost ~2 s on a laptop CPU, the load that overwrites them ~0.2 s). `load_into` checks that every
    tensor is then loaded, so no uninitialised memory survives."""
    names = ("normal_", "zeros_", "ones_", "uniform_", "kaiming_uniform_", "trunc_normal_", "constant_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def empty_model(cfg: ModelConfig) -> DecoderLM | EncoderLM | Seq2SeqLM:
    """A model of this shape with uninitialised weights, for loading a checkpoint into."""
    with _skip_init():
        return build_model(cfg)


def expected_shapes(cfg: ModelConfig) -> dict[str, Tensor]:
    """The state dict a model of this shape saves (tied head left out), as free meta tensors."""
    with torch.device("meta"):
        own = build_model(cfg).state_dict()
    if cfg.tie_embeddings:
        own.pop("lm_head.weight", None)
    return own


def check_weights(cfg: ModelConfig, weights: dict[str, Tensor], where: str | Path) -> None:
    """Every tensor a model of this shape needs, with the right shape, and nothing else: or a one-line error
    naming `where` and the first tensor that does not fit. Costs no copy: the tensors are adopted, not copied."""
    load_into(empty_model(cfg), weights, where, assign=True, optional=OPTIONAL_HEADS if cfg.arch == "bert" else ())


__all__ = ["ARCHITECTURES", "OPTIONAL_HEADS", "DecoderLM", "DecoderOutput", "EncoderLM", "EncoderOutput", "KVCache",
           "ModelConfig", "Seq2SeqLM", "Seq2SeqOutput", "build_model", "check_weights", "empty_model",
           "expected_shapes"]
