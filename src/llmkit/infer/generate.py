"""Text generation: a pre-allocated KV cache, greedy or sampled decoding, stop strings, streaming, batches.

Prompts of different lengths share one batch by left padding: every row's last prompt token sits in the same
column, so one decode step serves all rows. Position ids count from each row's first real token, and the
padding is masked out of attention, so a padded row computes exactly what it would alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import ConfigError
from llmkit.infer.step import fast_forward
from llmkit.infer.textstream import TextStream


@dataclass
class SamplingConfig:
    """How tokens are chosen."""

    max_new_tokens: int = 200
    """Most tokens to generate per prompt."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy (always the most likely token)."""
    top_k: int = 0
    """Sample only among the k most likely tokens (0 = no limit)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches p (1 = no limit)."""
    repetition_penalty: float = 1.0
    """Divide the logits of tokens already present by this (>1 discourages repeats; 1 = off)."""
    seed: int | None = None
    """Seed for sampling; the same seed and prompt give the same text."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a generation (not included in the output)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")
        if any(s == "" for s in self.stop):  # "" occurs in every text: it would stop before the first token
            raise ConfigError("--stop: an empty stop string would end every generation at once; give a non-empty "
                              "string")


@dataclass
class Generation:
    prompt: str
    text: str  # the continuation only
    token_ids: list[int]  # the tokens of `text`: none past a stop string (the last may also hold its start)
    finish_reason: str  # "eos", "stop", "length"
    context_full: bool = False  # "length" came from the model's context window, before max_new_tokens
    decode_seconds: float = 0.0  # wall time of the generation itself (prefill + decoding; loading excluded)
    # Speculative decoding only (None without a draft): tokens drafted, drafted tokens the target accepted,
    # target forward passes (prefill included).
    drafted: int | None = None
    accepted: int | None = None
    target_forwards: int | None = None

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted: how often the draft guessed the target's token."""
        if self.drafted is None or self.accepted is None:
            return None
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_forward(self) -> float | None:
        """New tokens per target forward pass: 1 for plain decoding; what speculation multiplies."""
        return len(self.token_ids) / self.target_forwards if self.target_forwards else None


class Speculator(Protocol):
    """What `generate(draft=...)` hands decoding to (infer/speculative.Speculation). A protocol, so this module
    need not import speculative.py, which builds on it."""

    def run(self, model: torch.nn.Module, tokenizer: Tokenizer, prompts: list, encoded: list[list[int]],
            cfg: SamplingConfig, on_text: Callable[[int, str], None] | None, eos: set[int]) -> list[Generation]: ...


def process_logits(logits: Tensor, seen: Tensor | None, cfg: SamplingConfig) -> Tensor:
    """(B, V) raw logits -> (B, V) logits after repetition penalty, temperature, top-k and top-p."""
    if cfg.repetition_penalty != 1.0 and seen is not None:
        scores = logits.gather(1, seen)  # (B, S)
        scores = torch.where(scores > 0, scores / cfg.repetition_penalty, scores * cfg.repetition_penalty)
        logits = logits.scatter(1, seen, scores)
    if cfg.temperature == 0:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > cfg.top_p  # keep the token that crosses p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def pick(logits: Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> Tensor:
    """(B, V) processed logits -> (B,) tokens: argmax when greedy, else one draw per row from `gen`."""
    if cfg.temperature == 0:
        return logits.argmax(-1)  # (B,)
    probs = logits.float().softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def new_generator(cfg: SamplingConfig, device: torch.device) -> torch.Generator | None:
    """The seeded generator a sampled request draws from (None = the global RNG): one per request, so a seeded
    text does not depend on what else runs beside it."""
    if cfg.seed is None or cfg.temperature == 0:
        return None
    return torch.Generator(device=device).manual_seed(cfg.seed)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: list[str] | list[list[int]],
    cfg: SamplingConfig,
    on_text: Callable[[int, str], None] | None = None,
    eos_ids: set[int] | None = None,
    draft: Speculator | None = None,
) -> list[Generation]:
    """Continue each prompt. `on_text(row, new_text)` streams text as soon as it decodes cleanly. With a `draft`
    (infer/speculative.py) decoding is speculative: prompts run one at a time, greedy output is the same.

    Text prompts get BOS first when the tokenizer asks for it (`Tokenizer.add_bos`); id prompts are used as
    given. The context window bounds prompt + continuation: when it allows fewer than `max_new_tokens`, a
    generation that reaches it ends with finish_reason "length" and `context_full` set (the window does not slide).
    """
    t0 = time.perf_counter()
    model.eval()
    device = next(model.parameters()).device
    mcfg = model.cfg
    encoded = [p if isinstance(p, list) else tokenizer.encode_prompt(p) for p in prompts]
    # An empty prompt starts a fresh document: BOS where the model wants one, else the end-of-document token.
    encoded = [ids or tokenizer.with_bos([]) or [tokenizer.eos_id] for ids in encoded]
    B, L = len(encoded), max(len(ids) for ids in encoded)
    if L >= mcfg.block_size:
        raise ConfigError(f"prompt is {L} tokens, the model's context is {mcfg.block_size}")
    new = min(cfg.max_new_tokens, mcfg.block_size - L)
    eos = eos_ids if eos_ids is not None else {tokenizer.eos_id}
    if draft is not None:
        return draft.run(model, tokenizer, prompts, encoded, cfg, on_text, eos)
    ids = torch.full((B, L), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((B, L + new), dtype=torch.long)
    for i, row in enumerate(encoded):
        ids[i, L - len(row):] = torch.tensor(row)
        mask[i, L - len(row):] = 1
    mask[:, L:] = 1  # generated tokens are always real
    ids, mask = ids.to(device), mask.to(device)
    padded = bool((mask[:, :L] == 0).any())
    gen = new_generator(cfg, device)

    cache = model.new_cache(B, L + new)
    forward = fast_forward(model)
    out = forward(ids, attention_mask_2d=mask[:, :L] if padded else None, cache=cache, logits_slice=slice(-1, None))
    # Tokens already present, for the repetition penalty; padding stands in as the row's last prompt token.
    seen = torch.where(mask[:, :L].bool(), ids, ids[:, -1:]) if cfg.repetition_penalty != 1.0 else None
    streams = [TextStream(tokenizer, cfg.stop) for _ in range(B)]
    finish = [""] * B
    for t in range(new):
        logits = out.logits[:, -1, : mcfg.vocab_size].float()  # (B, V) without the vocabulary padding
        nxt = pick(process_logits(logits, seen, cfg), cfg, gen)  # (B,)
        for i, tok in enumerate(nxt.tolist()):
            if finish[i]:
                continue
            if tok in eos:
                finish[i] = "eos"
                streams[i].finish()
            elif streams[i].push(tok):
                finish[i] = "stop"
            if on_text is not None:
                piece, _ = streams[i].take()
                if piece:
                    on_text(i, piece)
        if all(finish) or t == new - 1:
            break
        step_ids = nxt[:, None]  # (B, 1)
        if seen is not None:
            seen = torch.cat([seen, step_ids], dim=1)
        out = forward(step_ids, attention_mask_2d=mask[:, : L + t + 1] if padded else None, cache=cache)
    results = []
    for i, stream in enumerate(streams):
        stream.finish()
        piece, _ = stream.take()
        if on_text is not None and piece:
            on_text(i, piece)
        prompt = prompts[i] if isinstance(prompts[i], str) else tokenizer.decode(encoded[i])
        results.append(Generation(prompt=prompt, text=stream.text, token_ids=stream.ids,
                                  finish_reason=finish[i] or "length",
                                  context_full=not finish[i] and new < cfg.max_new_tokens,
                                  decode_seconds=time.perf_counter() - t0))
    return results
