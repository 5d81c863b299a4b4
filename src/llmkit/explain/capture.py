"""What every explanation starts from: the model as loaded for inference, the text as it reads it, and one forward
pass that keeps every layer's attention weights and residual stream.

The numbers must be the model's own, so nothing here re-implements a layer: the loader is `infer.load.load_model`
(a fine-tuned classifier through `tasks.classify.load_classifier`), the framing of the text is
`data.wordpiece.encode_texts` / `Tokenizer.encode_prompt` (what generation and classification feed the model), and
the weights come from `need_weights=True, need_hidden=True` on the model's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from llmkit.config import FinetuneRunConfig, ModelConfig
from llmkit.data.tokenizer import Tokenizer
from llmkit.data.wordpiece import encode_texts
from llmkit.errors import ConfigError
from llmkit.infer.load import load_model
from llmkit.model import DecoderLM, EncoderLM
from llmkit.tasks.classify import Classifier, load_classifier


@dataclass
class Subject:
    """A model ready to be explained: eval mode, float32, parameters frozen (gradients flow to inputs only)."""

    name: str  # the source as given
    backbone: DecoderLM | EncoderLM
    classifier: Classifier | None  # a fine-tuned classifier's whole model (backbone + head), else None
    tokenizer: Tokenizer
    cfg: ModelConfig
    kind: str  # "decoder" | "encoder" | "classifier"
    labels: list[str] | None  # a classifier's classes
    has_mlm_head: bool  # an encoder whose checkpoint carries a trained masked-LM head (all-MiniLM does not)


@dataclass
class Capture:
    """One forward pass over one text (batch of one; the batch dimension is dropped)."""

    ids: Tensor  # (T,) int64
    tokens: list[str]  # display string of each token
    attentions: list[Tensor]  # n_layer x (nh, T, T) float32, each row a softmax
    hidden_states: list[Tensor]  # n_layer + 1 x (T, C): embeddings' output, then each block's (before a final norm)
    logits: Tensor | None  # decoder: (Vpad,) next-token logits at the last position; classifier: (K,); else None


def load_subject(model: str | Path, device: str = "cpu") -> Subject:
    """Load any source the CLI accepts; a run folder written by `llmkit finetune --task classify` becomes a
    classifier (its head loaded), anything else a decoder or encoder."""
    got = load_model(model, device=device, dtype="float32")
    run = got.run
    if isinstance(run, FinetuneRunConfig) and run.train.objective == "classify" and run.finetune.labels:
        clf = load_classifier(got)  # the checked head-loading path `llmkit classify` uses, on what is loaded
        clf.model.requires_grad_(False)
        backbone = clf.model.backbone
        return Subject(str(model), backbone, clf.model, clf.tokenizer, backbone.cfg, "classifier",
                       list(clf.labels), False)
    got.model.requires_grad_(False)
    encoder = isinstance(got.model, EncoderLM)
    has_mlm = encoder and any(k.startswith("mlm.") for k in got.weights)
    return Subject(str(model), got.model, None, got.tokenizer, got.cfg, "encoder" if encoder else "decoder",
                   None, has_mlm)


def display_token(tok: Tokenizer, token_id: int) -> str:
    """How a person should see one token: decoded on its own (" the", not "Ġthe"); WordPiece keeps its vocabulary
    spelling ("##ing"), which says the piece continues a word. A lone byte of a multi-byte character shows as the
    replacement character, which is what it is."""
    if tok.kind == "wordpiece":
        return tok.tk.id_to_token(token_id) or tok.decode([token_id])
    return tok.decode([token_id])


def tokenize(subject: Subject, text: str) -> list[int]:
    """The ids the model reads for `text`, framed as in training: `[CLS] text [SEP]` for WordPiece encoders, BOS
    first for decoders that want it. Empty text or text beyond the model's context is a ConfigError."""
    if not text.strip():
        raise ConfigError("--text is empty: give the text to explain")
    tok = subject.tokenizer
    ids = encode_texts(tok, [text], 1 << 30)[0] if tok.kind == "wordpiece" else tok.encode_prompt(text)
    limit = subject.cfg.block_size
    if len(ids) > limit:
        raise ConfigError(f"--text is {len(ids)} tokens; {subject.name} reads at most {limit} (its block_size): "
                          "shorten the text")
    return ids


@torch.no_grad()
def capture(subject: Subject, ids: list[int]) -> Capture:
    """One forward pass with attention weights and hidden states (eager attention: the softmax weights the model
    actually multiplies the values by)."""
    device = subject.backbone.embed.weight.device
    x = torch.tensor([ids], device=device)  # (1, T)
    if subject.kind == "decoder":
        out = subject.backbone(x, need_weights=True, need_hidden=True, logits_slice=slice(-1, None))
        logits = out.logits[0, -1].float()  # (Vpad,)
    else:
        out = subject.backbone(x, need_weights=True, need_hidden=True)
        logits = subject.classifier(x).logits[0].float() if subject.classifier is not None else None  # (K,)
    return Capture(ids=x[0], tokens=[display_token(subject.tokenizer, i) for i in ids],
                   attentions=[a[0].float() for a in out.attentions],  # n_layer x (nh, T, T)
                   hidden_states=[h[0].float() for h in out.hidden_states],  # n_layer + 1 x (T, C)
                   logits=logits)
