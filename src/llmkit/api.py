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
from llmkit.config import ModelConfig, read_run_folder_config
from llmkit.generate import Generation, SamplingConfig, generate
from llmkit.model import DecoderLM
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
                 eos_ids: set[int] | None = None, **sampling) -> Generation | list[Generation]:
        """Continue one prompt (returns a Generation) or a list (returns a list, batched with left padding).
        `eos_ids` replaces the tokenizer's eos as the set of tokens that end a generation."""
        cfg = sampling.pop("config", None) or SamplingConfig()
        cfg = replace(cfg, **sampling)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        out = generate(self.model, self.tokenizer, prompts, cfg, on_text=on_text, eos_ids=eos_ids)
        return out[0] if isinstance(prompt, str) else out

    def chat(self, messages: list[dict[str, str]], on_text: Callable[[int, str], None] | None = None,
             **sampling) -> Generation:
        """Answer a conversation ([{"role": "user", "content": ...}, ...]) through the model's chat template,
        stopping at the template's end-of-turn token."""
        from llmkit.convert import end_of_turn_ids

        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt)
        return self.generate([ids], on_text=on_text, eos_ids=set(end_of_turn_ids(self.tokenizer)), **sampling)[0]


def load_run_model_config(run_dir: Path) -> ModelConfig:
    return read_run_folder_config(run_dir).model


def load(path: str | Path, device: str = "auto", dtype: str = "float32") -> LLM:
    """Load a model for inference from a built-in name (`llmkit models`), an llmkit run folder (config.yaml +
    model.safetensors + tokenizer/), a Hugging Face folder (config.json + safetensors) or a `.gguf` file.
    GGUF files and GGUF built-ins are converted once into a cached run folder (see `llmkit.registry`)."""
    from llmkit.convert import empty_model, read_hf_folder
    from llmkit.registry import locate

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    run_dir = locate(path)
    if (run_dir / "config.yaml").is_file():
        mcfg = load_run_model_config(run_dir)
        weights_file = run_dir / "model.safetensors"
        weights, source, tokenizer = load_weights(weights_file), weights_file, Tokenizer.load(run_dir / "tokenizer")
    else:
        conv = read_hf_folder(run_dir)
        mcfg, weights, source, tokenizer = conv.cfg, conv.weights, run_dir, conv.tokenizer
    model = empty_model(mcfg)  # no random init: every tensor is loaded (and checked) right away
    load_into(model, weights, source, assign=True)
    model.to(device=dev, dtype=torch_dtype).eval()
    return LLM(model=model, tokenizer=tokenizer, path=run_dir)
