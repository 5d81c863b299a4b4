"""The llmkit run folder as a model format: config.yaml + model.safetensors + tokenizer/ (+ source.json).

Every conversion goes through one in-memory form, `Converted` (a ModelConfig, llmkit-named weights and a
Tokenizer); this module reads and writes it as a run folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmkit.config import FinetuneRunConfig, ModelConfig, RunConfig, read_run_folder_config, save_yaml
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import CheckpointError
from llmkit.files import atomic_dir, atomic_write_text
from llmkit.model.weights import load_weights, save_weights


@dataclass
class Converted:
    """A model in memory between formats: llmkit config + llmkit-named weights + tokenizer."""

    cfg: ModelConfig
    weights: dict[str, Tensor]
    tokenizer: Tokenizer
    source: dict[str, Any] = field(default_factory=dict)  # where it came from, written to source.json
    run: RunConfig | None = None  # the whole resolved config, when the source is an llmkit run folder

    @property
    def is_classifier(self) -> bool:
        """A run folder from `llmkit finetune --task classify`: a backbone plus a classification head."""
        return isinstance(self.run, FinetuneRunConfig) and self.run.train.objective == "classify"

    def describe(self) -> str:
        """What this model is and which verbs use it, for errors that say what the model can do."""
        if self.is_classifier:
            labels = ", ".join(self.run.finetune.labels)  # type: ignore[union-attr]
            return f"a text classifier ({labels}) on a {self.cfg.arch} backbone: use `llmkit classify`"
        if self.cfg.arch == "bert":
            return "a BERT encoder: it embeds and classifies (`llmkit embed`, `llmkit search`, `llmkit finetune`)"
        if self.cfg.arch == "mbart":
            return "an encoder–decoder: it rewrites text (`llmkit eval --task text2text`, `llmkit convert --to hf`)"
        return f"a {self.cfg.arch} decoder: it generates and scores text"

    def backbone_weights(self) -> dict[str, Tensor]:
        """The language model's own weights: a classifier's `backbone.*` without its head, else all."""
        if not self.is_classifier:
            return self.weights
        return {k.removeprefix("backbone."): v for k, v in self.weights.items() if k.startswith("backbone.")}


# What `write_hf_folder` puts in an HF folder: such a folder (and only such) may be replaced by a new export.
HF_EXPORT_FILES = frozenset({"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                             "tokenizer_config.json"})


def check_replaceable(dst: Path) -> None:
    """Refuse to write over a folder llmkit did not write: a conversion replaces `dst` as a whole (atomic_dir),
    so anything else in it would be deleted. Allowed: no folder, an empty one, an llmkit run folder
    (config.yaml + model.safetensors) or an HF folder holding only what an export writes."""
    if not dst.exists():
        return
    if not dst.is_dir():
        raise CheckpointError(f"--out {dst}: is a file, not a folder; give a new or empty folder")
    names = {p.name for p in dst.iterdir()}
    if not names or {"config.yaml", "model.safetensors"} <= names:
        return
    if {"config.json", "model.safetensors"} <= names and names <= HF_EXPORT_FILES:
        return
    foreign = sorted(names - HF_EXPORT_FILES) or sorted(names)
    raise CheckpointError(f"--out {dst}: the folder holds files llmkit did not write ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}) and writing would replace it; give a new or "
                          "empty folder")


def read_run_folder(src: str | Path) -> Converted:
    src = Path(src)
    run = read_run_folder_config(src)
    return Converted(run.model, load_weights(src / "model.safetensors"), Tokenizer.load(src / "tokenizer"),
                     {"format": "llmkit", "path": str(src.resolve())}, run=run)


def write_run_folder(conv: Converted, dst: str | Path, dtype: torch.dtype | None = None) -> Path:
    """config.yaml (model section) + model.safetensors + tokenizer/ + source.json, written atomically."""
    dst = Path(dst)
    check_replaceable(dst)
    weights = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in conv.weights.items()}
    with atomic_dir(dst) as tmp:
        save_yaml(RunConfig(model=conv.cfg), tmp / "config.yaml")
        save_weights(weights, tmp / "model.safetensors")
        conv.tokenizer.save(tmp / "tokenizer")
        atomic_write_text(tmp / "source.json", json.dumps(conv.source, indent=2))
    return dst


