"""Load a pretrained backbone (model + tokenizer) for fine-tuning, classification and embeddings.

Sources: an llmkit run folder, a Hugging Face folder (BERT here; GPT-2/Llama and GGUF through `convert`), or a
built-in name from the model registry (`all-minilm-l6-v2`, `smollm2-135m-instruct`, ...). BERT checkpoints made
for sentence embeddings carry no pre-training heads; those heads keep their fresh init, nothing else may be
missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from llmkit.checkpoint import load_into, load_weights
from llmkit.config import ModelConfig, read_run_folder_config
from llmkit.errors import CheckpointError
from llmkit.hf import from_hf_state_dict, model_config_from_hf
from llmkit.model import build_model
from llmkit.tokenizer import Tokenizer

HEAD_PREFIXES = ("mlm.", "nsp.", "pooler.")  # parts of an EncoderLM a checkpoint may leave out
HF_BUFFERS = ("embeddings.position_ids",)  # buffers, not weights


@dataclass
class Backbone:
    model: nn.Module  # DecoderLM or EncoderLM, eval mode, float32, on CPU
    tokenizer: Tokenizer
    cfg: ModelConfig
    source: str


def read_bert_folder(src: Path) -> tuple[ModelConfig, dict[str, Tensor], Tokenizer]:
    """An HF BERT folder (config.json, model.safetensors, tokenizer.json) -> llmkit config, weights, tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer

    from llmkit.convert import read_json, read_safetensors_folder
    from llmkit.wordpiece import wrap_bert_tokenizer

    cfg = model_config_from_hf(read_json(src / "config.json"))
    hf = {k: v for k, v in read_safetensors_folder(src).items() if not k.endswith(HF_BUFFERS)}
    with torch.device("meta"):
        expected = build_model(cfg).state_dict()
    weights = from_hf_state_dict(hf, cfg, expected)
    if not (src / "tokenizer.json").is_file():
        raise CheckpointError(f"{src}: no tokenizer.json to go with the weights")
    return cfg, weights, wrap_bert_tokenizer(HFTokenizer.from_file(str(src / "tokenizer.json")))


def resolve_source(name: str) -> Path:
    """A folder as given; a built-in name or `.gguf` file -> its folder (GGUF converted once, then cached)."""
    from llmkit.registry import locate

    return locate(name)


def load_backbone(name: str, seed: int = 0) -> Backbone:
    """Any pretrained model source -> model + tokenizer (heads a checkpoint lacks are initialised from `seed`)."""
    src = resolve_source(name)
    torch.manual_seed(seed)
    if src.is_dir() and (src / "config.yaml").is_file():
        cfg = read_run_folder_config(src).model
        weights, tok = load_weights(src / "model.safetensors"), Tokenizer.load(src / "tokenizer")
        if any(k.startswith("backbone.") for k in weights):  # a fine-tuned classifier: keep its backbone
            weights = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    elif src.is_dir() and (src / "config.json").is_file() and _model_type(src) == "bert":
        cfg, weights, tok = read_bert_folder(src)
    else:
        from llmkit.convert import read_any

        conv = read_any(src)
        cfg, weights, tok = conv.cfg, conv.weights, conv.tokenizer
    model = build_model(cfg)
    # Strict by name and shape, except that an encoder's pre-training heads and pooler may be absent.
    load_into(model, {k: v.float() for k, v in weights.items()}, str(src), optional=HEAD_PREFIXES)
    return Backbone(model=model.eval(), tokenizer=tok, cfg=cfg, source=str(name))


def _model_type(src: Path) -> str | None:
    from llmkit.convert import read_json

    return read_json(src / "config.json").get("model_type")
