"""The running batch: one shared KV cache whose rows are right-aligned, rows joining and leaving between steps.

Every row's newest token sits in the same cache column, so one decode step of the unchanged model serves all rows;
a row's earlier columns are left padding, masked out, and DecoderLM counts its positions from its first real token
(the mask's cumsum), so a row computes what it would alone. Memory follows the rows actually running: the cache is
reallocated, with one copy, only when the membership changes (a join or a leave), never per step and never with
idle slots, so one client alone pays for one row. On a leave, leading columns that no live row uses are dropped in
the same copy, so the span is always the longest live row (at most max_context). The capacity grows with the
span (doubling, so copies stay amortised) up to the largest `prompt + max_new_tokens - 1` of the live rows: a chat
request that leaves max_tokens to the model's 8,192-token context holds memory for what it has written, not for
8,192 positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmkit.infer.generate import SamplingConfig, new_generator, pick, process_logits
from llmkit.infer.textstream import TextStream, token_bytes
from llmkit.model.layers import KVCache

GROW = 256  # columns a new cache holds beyond the span at least, so short answers never copy


@dataclass
class TokenLogprob:
    """One emitted token's log-probability (log_softmax of the raw logits, before temperature, float32)."""

    token: str  # the token's own text (U+FFFD when it is part of a character: see `bytes`)
    logprob: float
    bytes: list[int]  # the token's exact UTF-8 bytes, even when it holds only part of a character
    top: list[tuple[str, float]]  # the k most likely tokens at this step, best first (k = Request.logprobs)


@dataclass
class Row:
    """One request's decoding state while it holds a batch slot."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    eos_ids: set[int]
    logprobs: int | None
    stream: TextStream
    gen: torch.Generator | None
    generated: list[int] = field(default_factory=list)  # every sampled token, eos included
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # parallel to the tokens pushed to `stream`
    length: int = 0  # tokens of this row in the cache
    finish: str | None = None  # "stop" or "length" once done

    @property
    def capacity(self) -> int:
        """Cache columns this row needs to finish: its last sampled token is never fed back."""
        return len(self.prompt_ids) + self.sampling.max_new_tokens - 1


class Batch:
    """The rows holding slots, their shared cache (None when empty) and mask (B, capacity), 1 = real token."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.vocab = model.cfg.vocab_size
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        self.mask: Tensor | None = None

    def new_row(self, prompt_ids: list[int], sampling: SamplingConfig, eos_ids: set[int], logprobs: int | None,
                tokenizer) -> Row:
        return Row(prompt_ids, sampling, eos_ids, logprobs, TextStream(tokenizer, sampling.stop),
                   new_generator(sampling, self.device))

    def prefill(self, row: Row) -> KVCache:
        """Run a joining row's prompt alone (a batch-1 cache) and sample its first token."""
        ids = torch.tensor([row.prompt_ids], device=self.device)  # (1, P)
        cache = self.model.new_cache(1, len(row.prompt_ids))
        out = self.model(ids, cache=cache, logits_slice=slice(-1, None))
        row.length = len(row.prompt_ids)
        self.sample([row], out.logits[:, -1, : self.vocab].float())  # (1, V)
        return cache

    def add(self, rows: list[Row], caches: list[KVCache]) -> None:
        """Merge prefilled rows into the shared cache, right-aligned; if a prompt is longer than the current span,
        the running rows shift right. One new cache, one copy."""
        old = self.rows
        self.rows = old + rows
        span = max(r.length for r in self.rows)
        cache, mask = self._alloc(span)
        if old:
            shift = span - self.cache.pos
            cache.k[:, : len(old), :, shift:span] = self.cache.k[:, :, :, : self.cache.pos]
            cache.v[:, : len(old), :, shift:span] = self.cache.v[:, :, :, : self.cache.pos]
            mask[: len(old), shift:span] = self.mask[:, : self.cache.pos]
        for j, (row, c) in enumerate(zip(rows, caches)):
            b, P = len(old) + j, row.length
            cache.k[:, b, :, span - P:span] = c.k[:, 0, :, :P]  # (L, nkv, P, hs)
            cache.v[:, b, :, span - P:span] = c.v[:, 0, :, :P]
            mask[b, span - P:span] = 1
        cache.pos = span
        self.cache, self.mask = cache, mask

    def keep(self, keep: list[int]) -> None:
        """Drop the rows not in `keep` and the leading columns no remaining row uses (one copy, if anything
        changed)."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.mask = None
            return
        span = max(r.length for r in self.rows)
        lead, idx = self.cache.pos - span, torch.tensor(keep, device=self.device)
        cache, mask = self._alloc(span)
        cache.k[:, :, :, :span] = self.cache.k[:, idx, :, lead:self.cache.pos]  # (L, B, nkv, span, hs)
        cache.v[:, :, :, :span] = self.cache.v[:, idx, :, lead:self.cache.pos]
        mask[:, :span] = self.mask[idx, lead:self.cache.pos]
        cache.pos = span
        self.cache, self.mask = cache, mask

    def _alloc(self, span: int) -> tuple[KVCache, Tensor]:
        capacity = min(max(r.capacity for r in self.rows), max(2 * span, span + GROW))
        mask = torch.zeros((len(self.rows), capacity), dtype=torch.long, device=self.device)  # (B, capacity)
        return self.model.new_cache(len(self.rows), capacity), mask

    def _grow(self) -> None:
        """The span reached the cache's capacity: move to a larger cache (one copy)."""
        pos = self.cache.pos
        cache, mask = self._alloc(pos)
        if cache.max_len <= pos:  # the capacity rule (every row's prompt + max_new_tokens - 1) makes this impossible
            raise RuntimeError(f"batch cache full: span {pos}, capacity {cache.max_len}")
        cache.k[:, :, :, :pos] = self.cache.k[:, :, :, :pos]  # (L, B, nkv, pos, hs)
        cache.v[:, :, :, :pos] = self.cache.v[:, :, :, :pos]
        mask[:, :pos] = self.mask[:, :pos]
        cache.pos = pos
        self.cache, self.mask = cache, mask

    def step(self) -> None:
        """One decode step for every row: feed each row's last sampled token, sample the next."""
        pos = self.cache.pos
        if pos + 1 > self.cache.max_len:
            self._grow()
        ids = torch.tensor([[r.generated[-1]] for r in self.rows], device=self.device)  # (B, 1)
        self.mask[:, pos] = 1
        padded = any(r.length != pos for r in self.rows)  # no padding at all: the model's unmasked path
        out = self.model(ids, attention_mask_2d=self.mask[:, : pos + 1] if padded else None, cache=self.cache)
        for r in self.rows:
            r.length += 1
        self.sample(self.rows, out.logits[:, -1, : self.vocab].float())  # (B, V)

    def sample(self, rows: list[Row], logits: Tensor) -> None:
        """logits (B, V) raw -> one token per row, each with its own sampling settings and generator."""
        plain = [i for i, r in enumerate(rows) if r.sampling.temperature == 0 and r.sampling.repetition_penalty == 1]
        greedy = logits[plain].argmax(-1).tolist() if plain else []  # (b,) one argmax for all plain greedy rows
        chosen = dict(zip(plain, greedy))
        for i, row in enumerate(rows):
            if i not in chosen:
                cfg = row.sampling
                seen = None
                if cfg.repetition_penalty != 1.0:
                    seen = torch.tensor([row.prompt_ids + row.generated], device=self.device)  # (1, S)
                chosen[i] = int(pick(process_logits(logits[i:i + 1], seen, cfg), cfg, row.gen)[0])
            self._accept(row, chosen[i], logits[i])

    def _accept(self, row: Row, token: int, logits: Tensor) -> None:
        row.generated.append(token)
        if token in row.eos_ids:
            row.finish = "stop"
            row.stream.finish()
            return
        if row.logprobs is not None:
            row.token_logprobs.append(self._logprob(row, token, logits))
        if row.stream.push(token):
            row.finish = "stop"
        elif len(row.generated) >= row.sampling.max_new_tokens:
            row.finish = "length"
            row.stream.finish()

    def _logprob(self, row: Row, token: int, logits: Tensor) -> TokenLogprob:
        lp = torch.log_softmax(logits.float(), dim=-1)  # (V,)
        tok = row.stream.tokenizer
        top = torch.topk(lp, min(row.logprobs, lp.shape[-1])) if row.logprobs else None
        alternatives = [] if top is None else [(tok.decode([int(i)]), float(v))
                                               for v, i in zip(top.values.tolist(), top.indices.tolist())]
        return TokenLogprob(token=tok.decode([token]), logprob=float(lp[token]),
                            bytes=list(token_bytes(tok, token)), top=alternatives)
