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
from llmkit.errors import ConfigError
from llmkit.infer.generate import Generation, SamplingConfig, generate
from llmkit.infer.load import Loaded, load_model
from llmkit.infer.speculative import Speculation, check_same_vocabulary
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
                 eos_ids: set[int] | None = None, draft: DraftSpec | None = None, draft_tokens: int = 5,
                 ngram_size: int = 3, **sampling) -> Generation | list[Generation]:
        """Continue one prompt (returns a Generation) or a list (returns a list, batched with left padding).
        `eos_ids` replaces the tokenizer's eos as the set of tokens that end a generation.

        `draft` makes decoding speculative (one prompt at a time): an LLM / Loaded model sharing this model's
        tokenizer, a model source to load as one (`load_draft`), or "ngram" for prompt lookup; `draft_tokens`
        tokens are drafted per target pass, n-gram lookup matches up to `ngram_size` tokens."""
        cfg = sampling.pop("config", None) or SamplingConfig()
        cfg = replace(cfg, **sampling)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        spec = self.speculation(draft, draft_tokens, ngram_size) if draft is not None else None
        out = generate(self.model, self.tokenizer, prompts, cfg, on_text=on_text, eos_ids=eos_ids, draft=spec)
        return out[0] if isinstance(prompt, str) else out

    def speculation(self, draft: DraftSpec, draft_tokens: int = 5, ngram_size: int = 3) -> Speculation:
        """The speculative decoding plan for `draft` against this model; a draft with another vocabulary is a
        one-line ConfigError naming both models."""
        if isinstance(draft, Speculation):
            return draft
        if draft == "ngram":
            return Speculation(None, draft_tokens=draft_tokens, ngram_size=ngram_size)
        if isinstance(draft, (str, Path)):
            draft = load_draft(draft, self)
        name = str(draft.path if isinstance(draft, LLM) else draft.source)
        if not isinstance(draft.model, DecoderLM):
            raise ConfigError(f"--draft {name} is not a text generator; a draft must be a decoder sharing the "
                              "target's tokenizer, or `ngram`")
        check_same_vocabulary((str(self.path), self.tokenizer, self.model.cfg),
                              (name, draft.tokenizer, draft.model.cfg))
        return Speculation(draft.model, draft_tokens=draft_tokens, ngram_size=ngram_size, name=name)

    def chat(self, messages: list[dict[str, str]], on_text: Callable[[int, str], None] | None = None,
             **sampling) -> Generation:
        """Answer a conversation ([{"role": "user", "content": ...}, ...]) through the model's chat template,
        stopping at the template's end-of-turn token."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode_prompt(prompt)  # BOS unless the template wrote it already
        return self.generate([ids], on_text=on_text, eos_ids=set(end_of_turn_ids(self.tokenizer)), **sampling)[0]


def load_draft(src: str | Path, target: LLM, dtype: str | None = None) -> LLM:
    """Load a draft model for speculative decoding onto the target's device, in the target's dtype unless told,
    refusing one whose vocabulary differs from the target's (before any generation)."""
    dtype = dtype or str(next(target.model.parameters()).dtype).removeprefix("torch.")
    draft = load(src, device=str(target.device), dtype=dtype)
    check_same_vocabulary((str(target.path), target.tokenizer, target.model.cfg),
                          (str(src), draft.tokenizer, draft.model.cfg))
    return draft


def load(path: str | Path, device: str = "auto", dtype: str = "float32") -> LLM:
    """Load a text generator from a built-in name (`llmkit models`), an llmkit run folder (config.yaml +
    model.safetensors + tokenizer/), a Hugging Face folder (config.json + safetensors) or a `.gguf` file.
    GGUF files and GGUF built-ins are converted once into a cached run folder (see `interop/registry.py`)."""
    got = load_model(path, device=device, dtype=dtype, need="decoder")
    return LLM(model=got.model, tokenizer=got.tokenizer, path=Path(path))


DraftSpec = LLM | Loaded | Speculation | str | Path  # what `draft=` accepts: a model, a source, or "ngram"
