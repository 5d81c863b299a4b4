"""The one model loader: any model source -> a module on a device, with its tokenizer, ready for inference.

Sources (resolved by `interop.sources.read_any`): an llmkit run folder, a Hugging Face folder (GPT-2, Llama, BERT),
a `.gguf` file or a built-in name. `llmkit.load`, generation, evaluation, chat, embeddings and classification
all load through here. An encoder checkpoint made for sentence embeddings carries no pre-training heads (MLM,
NSP, pooler); those keep a seeded fresh init, nothing else may be missing. `need="decoder"` turns an encoder or
a classifier into a one-line error that says what that model can do instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmkit.config import ModelConfig, RunConfig
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import CheckpointError
from llmkit.interop.run_folder import Converted
from llmkit.interop.sources import read_any
from llmkit.model import OPTIONAL_HEADS, DecoderLM, EncoderLM, Seq2SeqLM, build_model, empty_model, expected_shapes
from llmkit.model.quant import is_quantized, load_quantized
from llmkit.model.weights import load_into
from llmkit.runtime import resolve_device, resolve_dtype


@dataclass
class Loaded:
    model: DecoderLM | EncoderLM | Seq2SeqLM  # eval mode, on the asked device and dtype
    tokenizer: Tokenizer
    cfg: ModelConfig
    source: Path | str
    run: RunConfig | None  # the run folder's whole config (a classifier's labels live here), else None
    weights: dict[str, torch.Tensor]  # everything the source holds (a classifier's head too), as loaded


def load_model(src: str | Path, device: str = "cpu", dtype: str = "float32", need: str = "any",
               seed: int = 0) -> Loaded:
    """Load `src` for inference. `need="decoder"` refuses encoders and classifiers with a one-line error."""
    conv: Converted = read_any(src)
    if need == "decoder" and (conv.cfg.arch in ("bert", "mbart") or conv.is_classifier):
        raise CheckpointError(f"{src}: {conv.describe()}; this verb needs a text generator (a gpt2 or llama "
                              "decoder)")
    weights = conv.backbone_weights()
    where = Path(conv.source.get("path", src))
    if conv.source.get("format") == "llmkit":
        where = where / "model.safetensors"
    dev = resolve_device(device)
    missing_heads = [n for n in expected_shapes(conv.cfg) if n not in weights and n.startswith(OPTIONAL_HEADS)]
    if missing_heads:  # heads to initialise: build normally (seeded), copy the checkpoint in
        torch.manual_seed(seed)
        model = build_model(conv.cfg)
        load_into(model, {k: v.float() for k, v in weights.items()}, where, optional=OPTIONAL_HEADS)
    elif is_quantized(weights):  # from `llmkit quantize`: int8/int4 layers swapped in, packed kernels
        model = empty_model(conv.cfg)
        load_quantized(model, weights, str(where))
    else:  # every tensor comes from the checkpoint: skip the random init and adopt the tensors as they are
        model = empty_model(conv.cfg)
        load_into(model, weights, where, assign=True)
    model.to(device=dev, dtype=resolve_dtype(dtype, dev)).eval()
    return Loaded(model=model, tokenizer=conv.tokenizer, cfg=conv.cfg, source=src, run=conv.run,
                  weights=conv.weights)
