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

from llmkit.data.tokenizer import Tokenizer, end_of_turn_ids
from llmkit.infer.generate import Generation, SamplingConfig, generate
from llmkit.infer.load import load_model
from llmkit.model import DecoderLM


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
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode_prompt(prompt)  # BOS unless the template wrote it already
        return self.generate([ids], on_text=on_text, eos_ids=set(end_of_turn_ids(self.tokenizer)), **sampling)[0]


def load(path: str | Path, device: str = "auto", dtype: str = "float32") -> LLM:
    """Load a text generator from a built-in name (`llmkit models`), an llmkit run folder (config.yaml +
    model.safetensors + tokenizer/), a Hugging Face folder (config.json + safetensors) or a `.gguf` file.
    GGUF files and GGUF built-ins are converted once into a cached run folder (see `interop/registry.py`)."""
    got = load_model(path, device=device, dtype=dtype, need="decoder")
    return LLM(model=got.model, tokenizer=got.tokenizer, path=Path(path))
