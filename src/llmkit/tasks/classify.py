"""Text classification with a pretrained encoder or decoder + a linear head: the model, predictions, scores.

A text is pooled to one vector (encoders: the BERT pooler on [CLS] or the mean of token states; decoders: the last
real token, the only one that has read the whole text) and a linear layer maps it to class logits. Training lives
in `tasks/finetune.py`; this module is what `llmkit classify` needs, and imports no training code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from llmkit.config import FinetuneRunConfig, load_yaml
from llmkit.data.batches import fixed_batches
from llmkit.data.labelled import Examples, eval_split
from llmkit.data.tokenizer import Tokenizer
from llmkit.data.wordpiece import encode_texts
from llmkit.errors import CheckpointError, ConfigError, DataError
from llmkit.infer.load import Loaded, load_model
from llmkit.model.encoder import last_token_pool, mean_pool
from llmkit.model.weights import load_into


@dataclass
class ClassifierOutput:
    logits: Tensor  # (B, K)
    pooled: Tensor  # (B, C)


class Classifier(nn.Module):
    """backbone (EncoderLM or DecoderLM) -> pooled (B, C) -> dropout -> classifier -> (B, K) logits.

    The head is named `classifier` (as in HF's BertForSequenceClassification), not `head`: peft matches
    `modules_to_save` by name suffix, and `head` would also catch a decoder's 28 M-parameter `lm_head`."""

    def __init__(self, backbone: nn.Module, n_labels: int, pooling: str, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone, self.pooling = backbone, pooling
        self.encoder = backbone.cfg.arch == "bert"  # type: ignore[union-attr]
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.cfg.n_embd, n_labels)  # type: ignore[union-attr]
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: Tensor, attention_mask_2d: Tensor | None = None) -> ClassifierOutput:
        if self.encoder:
            out = self.backbone(input_ids, attention_mask_2d=attention_mask_2d)
            pooled = out.pooled if self.pooling == "cls" else mean_pool(out.hidden, attention_mask_2d)
        else:  # logits_slice=slice(0, 0): skip the (B, T, V) vocabulary projection, only the states are needed
            out = self.backbone(input_ids, attention_mask_2d=attention_mask_2d, logits_slice=slice(0, 0))
            pooled = (mean_pool if self.pooling == "mean" else last_token_pool)(out.hidden, attention_mask_2d)
        return ClassifierOutput(logits=self.classifier(self.dropout(pooled)), pooled=pooled)  # (B, K), (B, C)


def resolve_pooling(pooling: str, arch: str) -> str:
    if pooling == "auto":
        return "mean" if arch == "bert" else "last"
    if pooling == "cls" and arch != "bert":
        raise ConfigError("finetune.pooling cls needs an encoder (bert); decoders pool with `last` or `mean`")
    return pooling


@torch.inference_mode()
def predict_proba(model: Classifier, tok: Tokenizer, texts: list[str], max_length: int,
                  batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, K) in the order of `texts`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches, order = fixed_batches(encode_texts(tok, texts, max_length), None, batch_size, tok.pad_id)
    probs = []
    for b in batches:
        logits = model(b["input_ids"].to(device), attention_mask_2d=b["attention_mask"].to(device)).logits
        probs.append(torch.softmax(logits.float(), dim=-1).cpu())
    model.train(was_training)
    out = np.empty((len(texts), model.classifier.out_features), dtype=np.float32)
    out[order] = torch.cat(probs).numpy()
    return out


def evaluate_classifier(model: Classifier, tok: Tokenizer, ex: Examples, labels: list[str], max_length: int,
                        batch_size: int = 64) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix (scikit-learn)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    pred = predict_proba(model, tok, ex.texts, max_length, batch_size).argmax(-1)
    true = np.array([labels.index(lab) for lab in ex.labels])
    k = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(true, pred, labels=k, zero_division=0)
    return {"accuracy": float(accuracy_score(true, pred)),
            "macro_f1": float(f1_score(true, pred, labels=k, average="macro", zero_division=0)),
            "per_class": {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                "support": int(s[i])} for i, lab in enumerate(labels)},
            "confusion_matrix": confusion_matrix(true, pred, labels=k).tolist(), "labels": labels,
            "n_test": len(ex)}


@dataclass
class LoadedClassifier:
    model: Classifier
    tokenizer: Tokenizer
    cfg: FinetuneRunConfig

    @property
    def labels(self) -> list[str]:
        return self.cfg.finetune.labels

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
        """One {label, probability, probabilities} per text."""
        probs = predict_proba(self.model, self.tokenizer, texts, self.cfg.finetune.max_length, batch_size)
        return [{"label": self.labels[int(p.argmax())], "probability": float(p.max()),
                 "probabilities": {lab: float(x) for lab, x in zip(self.labels, p)}} for p in probs]


def load_classifier(run_dir: str | Path | Loaded, device: str = "cpu") -> LoadedClassifier:
    """A run folder written by `llmkit finetune --task classify`, ready to predict (eval mode, float32); or that
    folder already loaded by `load_model` (`llmkit explain` loads first, then learns it is a classifier)."""
    got = run_dir if isinstance(run_dir, Loaded) else load_model(run_dir, device=device)
    run_dir = got.source
    cfg = got.run
    if not isinstance(cfg, FinetuneRunConfig) or cfg.train.objective != "classify" or not cfg.finetune.labels:
        what = f"trained with objective {cfg.train.objective!r}" if cfg is not None else f"a {got.cfg.arch} model"
        raise CheckpointError(f"{run_dir}: not a classifier ({what}); fine-tune one with "
                              "`llmkit finetune --task classify`")
    model = Classifier(got.model, len(cfg.finetune.labels), cfg.finetune.pooling).to(got.model.embed.weight.device)
    load_into(model, got.weights, Path(run_dir) / "model.safetensors")  # the head; the backbone again, checked
    return LoadedClassifier(model.eval(), got.tokenizer, cfg)


def is_classifier_run(src: str | Path) -> bool:
    """Whether `src` is a `finetune --task classify` run folder (read from its config.yaml alone, no weights):
    how `llmkit eval` picks its task when none is given."""
    cfg_file = Path(src) / "config.yaml"
    if not cfg_file.is_file():
        return False
    try:
        values = load_yaml(cfg_file)
    except (ConfigError, OSError):
        return False  # the loader says what is wrong with it
    return (values.get("train") or {}).get("objective") == "classify"


def evaluate_classifier_on(clf: LoadedClassifier, data: str, part: str = "test",
                           batch_size: int = 64) -> dict[str, Any]:
    """`llmkit eval` of a classifier: accuracy, macro-F1, per-class figures and the confusion matrix on one part
    of a labelled set (`all` = every row; a test-only set's test part is all of it)."""
    ft = clf.cfg.finetune
    ex = eval_split(data, part, ft.text_field, ft.label_field)
    unknown = sorted(set(ex.labels) - set(clf.labels))
    if unknown:
        raise DataError(f"{data}: label(s) {unknown} are not classes of this classifier ({', '.join(clf.labels)})")
    report = evaluate_classifier(clf.model, clf.tokenizer, ex, clf.labels, ft.max_length, batch_size)
    return {"data": data, "split": part, **report}
