"""The Python API: `llmkit.load(path)` gives a model with its tokenizer, ready to generate and score text.

    import llmkit
    lm = llmkit.load("runs/demo")
    print(lm.generate("ROMEO:", max_new_tokens=50, temperature=0).text)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from llmkit.checkpoint import load_into, load_weights
from llmkit.config import ModelConfig, RunConfig, build, load_yaml
from llmkit.errors import CheckpointError
from llmkit.generate import Generation, SamplingConfig, generate
from llmkit.model import DecoderLM, build_model
from llmkit.tokenizer import Tokenizer
from llmkit.train import resolve_device, resolve_dtype


@dataclass
class LLM:
    """A loaded model + tokenizer on a device."""

    model: DecoderLM
    tokenizer: Tokenizer
    path: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompt: str | list[str], on_text: Callable[[int, str], None] | None = None,
                 **sampling) -> Generation | list[Generation]:
        """Continue one prompt (returns a Generation) or a list (returns a list, batched with left padding)."""
        cfg = sampling.pop("config", None) or SamplingConfig()
        cfg = replace(cfg, **sampling)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        out = generate(self.model, self.tokenizer, prompts, cfg, on_text=on_text)
        return out[0] if isinstance(prompt, str) else out


def load_run_model_config(run_dir: Path) -> ModelConfig:
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"{run_dir}: no config.yaml (not an llmkit run folder)")
    return build(RunConfig, load_yaml(cfg_file)).model


def load(path: str | Path, device: str = "auto", dtype: str = "float32") -> LLM:
    """Load an llmkit run folder (config.yaml + model.safetensors + tokenizer/) for inference."""
    run_dir = Path(path)
    if not run_dir.exists():
        raise CheckpointError(f"model not found: {path} (give a run folder written by `llmkit pretrain`)")
    mcfg = load_run_model_config(run_dir)
    weights_file = run_dir / "model.safetensors"
    model = build_model(mcfg)
    load_into(model, load_weights(weights_file), weights_file)
    dev = resolve_device(device)
    model.to(device=dev, dtype=resolve_dtype(dtype, dev)).eval()
    return LLM(model=model, tokenizer=Tokenizer.load(run_dir / "tokenizer"), path=run_dir)
