"""Speculative decoding: a cheap draft proposes k tokens, the target checks them all in one forward pass.

At batch 1 a decode step is bound by reading every weight once, so the target scoring k + 1 positions costs about
what scoring one does; every drafted token it accepts is a decode step saved. The draft is a small model with the
same tokenizer (typically a distilled student) or prompt lookup (`NgramDraft`: copy what followed the last n tokens
the previous time they occurred; free, and good wherever the output repeats its input: summaries, code edits, RAG).

Greedy output is the target's own greedy output. Sampled output keeps the target's distribution by the rejection
rule of Leviathan et al. (2023) / Chen et al. (2023): drafted token x is accepted with probability min(1, p(x)/q(x)),
the first rejected one is replaced by a draw from norm(max(0, p - q)), and when all k pass a bonus token comes from
p. p and q are the distributions after the shared `process_logits` (temperature, top-k, top-p, repetition penalty,
each position with the tokens before it as "seen"); the n-gram draft is a point mass q.

Both KV caches are rewound past rejected tokens (`KVCache.rewind`), never recomputed. Prompts run one at a time:
batch 1 is the case this pays for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from llmkit.config import ModelConfig
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import ConfigError
from llmkit.infer.generate import Generation, SamplingConfig, new_generator, process_logits
from llmkit.infer.step import fast_forward
from llmkit.infer.textstream import TextStream
from llmkit.model import DecoderLM

Draft = DecoderLM | None  # a draft model, or None for n-gram (prompt-lookup) drafting


Named = tuple[str, Tokenizer, ModelConfig]  # a model's name (for messages), tokenizer and config
_AGREED: dict[tuple[int, int], tuple[Tokenizer, Tokenizer]] = {}  # tokenizer pairs found to agree


def check_same_vocabulary(target: Named, draft: Named) -> None:
    """A draft must speak the target's token ids: the same vocabulary (token -> id), not merely the same size,
    else its proposals are other tokens under the same numbers."""
    (tname, ttok, tcfg), (dname, dtok, dcfg) = target, draft
    known = _AGREED.get((id(ttok), id(dtok)), (None, None))
    if tcfg.vocab_size == dcfg.vocab_size and (ttok.tk is dtok.tk or (known[0] is ttok and known[1] is dtok)):
        return  # checked before: reading a large vocabulary takes ~0.3 s, too long to pay per generate call
    tvocab, dvocab = ttok.tk.get_vocab(with_added_tokens=True), dtok.tk.get_vocab(with_added_tokens=True)
    if tvocab == dvocab and tcfg.vocab_size == dcfg.vocab_size:
        _AGREED[(id(ttok), id(dtok))] = (ttok, dtok)  # holding them keeps their ids from being reused
        return
    why = "a different tokenizer" if len(tvocab) == len(dvocab) else "a different vocabulary"
    raise ConfigError(f"--draft {dname} has {why} from --model {tname} ({len(dvocab):,} tokens, model vocab "
                      f"{dcfg.vocab_size:,} vs {len(tvocab):,} tokens, model vocab {tcfg.vocab_size:,}); a draft must "
                      "share the target's tokenizer (e.g. a student distilled from it) or be `ngram`")


class NgramDraft:
    """Prompt-lookup drafting: find the latest earlier occurrence of the sequence's last n tokens (n = size, then
    shorter down to 1) and propose what followed it. The match is read as "the text repeats with this period", so a
    continuation that runs into the present keeps copying the drafted tokens (periodic text drafts k tokens).

    One instance follows one growing sequence: the n-grams seen so far are indexed as they arrive, so a lookup
    costs the same at token 2,000 as at token 20 (a scan would add milliseconds to every GPU step)."""

    def __init__(self, size: int = 3) -> None:
        self.size = size
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> latest start among those followed by a token
        self.indexed = 0  # n-grams ending before this position are in `latest`

    def propose(self, seq: list[int], k: int) -> list[int]:
        for end in range(self.indexed + 1, len(seq)):  # n-grams ending at the last token stay out: no successor
            for n in range(1, min(self.size, end) + 1):
                self.latest[tuple(seq[end - n:end])] = end - n
        self.indexed = max(self.indexed, len(seq) - 1)
        for n in range(min(self.size, len(seq) - 1), 0, -1):
            start = self.latest.get(tuple(seq[-n:]))
            if start is not None:
                period, ext = len(seq) - n - start, list(seq)
                for _ in range(k):
                    ext.append(ext[len(ext) - period])
                return ext[len(seq):]
        return []


class ModelDraft:
    """A small model that drafts autoregressively from its own KV cache, rewound to the accepted prefix."""

    def __init__(self, model: DecoderLM, cfg: SamplingConfig, seq_len: int,
                 gen: torch.Generator | None) -> None:
        self.model, self.cfg, self.gen = model, cfg, gen
        self.forward = fast_forward(model)
        self.vocab = model.cfg.vocab_size
        self.cache = model.new_cache(1, min(seq_len, model.cfg.block_size))

    def propose(self, seq: list[int], k: int) -> tuple[list[int], Tensor | None]:
        """Up to k tokens and, when sampling, their (k, V) proposal distributions q. The cache ends holding
        seq + all drafts but the last; tokens of `seq` it lacks are fed first (the bonus token, say)."""
        k = min(k, self.cache.max_len - len(seq) + 1)  # the draft's own context window
        if k <= 0:
            return [], None
        device = self.cache.k.device
        feed = torch.tensor([seq[self.cache.pos:]], device=device)  # (1, t)
        seen = torch.tensor([seq], device=device) if self.cfg.repetition_penalty != 1.0 else None  # (1, S)
        drafts, qs = [], []
        for j in range(k):
            out = self.forward(feed, cache=self.cache, logits_slice=slice(-1, None))
            scores = process_logits(out.logits[:, -1, : self.vocab].float(), seen, self.cfg)  # (1, V)
            if self.cfg.temperature == 0:
                tok = scores.argmax(-1, keepdim=True)  # (1, 1)
            else:
                q = scores.softmax(-1)  # (1, V)
                tok = torch.multinomial(q, 1, generator=self.gen)  # (1, 1)
                qs.append(q[0])
            drafts.append(tok)
            if j < k - 1:
                feed = tok
                seen = torch.cat([seen, tok], dim=1) if seen is not None else None
        return torch.cat(drafts, dim=1)[0].tolist(), torch.stack(qs) if qs else None  # q: (k, V)

    def keep(self, n: int) -> None:
        """The accepted sequence is n tokens long: keep at most its first n - 1 in the cache (the last one, the
        target's own pick, is fed on the next proposal)."""
        self.cache.rewind(min(self.cache.pos, n - 1))


def verify(scores: Tensor, drafts: list[int], q: Tensor | None, cfg: SamplingConfig,
           gen: torch.Generator | None) -> tuple[int, int]:
    """(accepted count a, next token): the target's (k + 1, V) processed logits against k drafted tokens.

    Greedy: drafts are kept while they are the target's argmax, then the target's argmax follows. Sampling: the
    rejection rule; `q` (k, V) is the draft's distributions, None for a point mass on each drafted token."""
    k = len(drafts)
    if cfg.temperature == 0:
        best = scores.argmax(-1).tolist()  # (k + 1,)
        a = 0
        while a < k and best[a] == drafts[a]:
            a += 1
        return a, best[a]
    p = scores.softmax(-1)  # (k + 1, V)
    if k:
        d = torch.tensor(drafts, device=p.device)  # (k,)
        rows = torch.arange(k, device=p.device)
        qd = q[rows, d] if q is not None else torch.ones(k, device=p.device)  # (k,)
        u = torch.rand(k, generator=gen, device=p.device)  # (k,)
        ok = (u * qd < p[rows, d]).tolist()  # u < p/q: accepted with probability min(1, p/q)
        a = ok.index(False) if False in ok else k
    else:
        a = 0
    if a == k:
        return a, int(torch.multinomial(p[k], 1, generator=gen))
    point = torch.zeros_like(p[a]).index_fill_(0, d[a:a + 1], 1.0)  # (V,) the n-gram draft's q
    resid = (p[a] - (q[a] if q is not None else point)).clamp(min=0)  # (V,)
    if resid.sum() <= 0:  # p == q up to rounding: a rejection had probability ~0; p is then the right law
        resid = p[a]
    return a, int(torch.multinomial(resid, 1, generator=gen))


@dataclass
class Speculation:
    """What `generate(draft=...)` runs: the draft (a model, or None for n-gram lookup) and how much it drafts.
    `llmkit.infer.api` builds it from what a caller names (a loaded model or "ngram") and checks the vocabulary."""

    draft: Draft
    draft_tokens: int = 5
    ngram_size: int = 3
    name: str = "ngram"

    def __post_init__(self) -> None:
        if self.draft_tokens < 1:
            raise ConfigError(f"--draft-tokens must be at least 1 (tokens drafted per target pass), got "
                              f"{self.draft_tokens}")
        if self.ngram_size < 1:
            raise ConfigError(f"--ngram-size must be at least 1, got {self.ngram_size}")

    def run(self, model: DecoderLM, tokenizer: Tokenizer, prompts: list, encoded: list[list[int]],
            cfg: SamplingConfig, on_text: Callable[[int, str], None] | None, eos: set[int]) -> list[Generation]:
        """generate()'s speculative path: each prompt alone, in order."""
        results = []
        for i, ids in enumerate(encoded):
            prompt = prompts[i] if isinstance(prompts[i], str) else tokenizer.decode(ids)
            results.append(self._one(model, tokenizer, prompt, ids, cfg, eos,
                                     (lambda text, row=i: on_text(row, text)) if on_text else None))
        return results

    def _one(self, model: DecoderLM, tokenizer: Tokenizer, prompt: str, ids: list[int], cfg: SamplingConfig,
             eos: set[int], on_text: Callable[[str], None] | None) -> Generation:
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        new = min(cfg.max_new_tokens, model.cfg.block_size - len(ids))
        gen = new_generator(cfg, device)
        forward, vocab = fast_forward(model), model.cfg.vocab_size
        cache = model.new_cache(1, len(ids) + new)
        drafter = ModelDraft(self.draft, cfg, len(ids) + new, gen) if self.draft is not None else None
        ngram = NgramDraft(self.ngram_size)
        seq, forwards, drafted, accepted = list(ids), 0, 0, 0
        if len(seq) > 1:  # the last prompt token is fed with the first drafts
            forward(torch.tensor([seq[:-1]], device=device), cache=cache, logits_slice=slice(-1, None))
            forwards += 1
        stream, finish, produced = TextStream(tokenizer, cfg.stop), "", 0
        while not finish and produced < new:
            k = min(self.draft_tokens, new - produced - 1)  # a block never runs past max_new_tokens or the context
            drafts, q = drafter.propose(seq, k) if drafter is not None else (ngram.propose(seq, k), None)
            out = forward(torch.tensor([[seq[-1], *drafts]], device=device), cache=cache)  # the verify pass
            forwards += 1
            logits = out.logits[0, :, :vocab].float()  # (k + 1, V)
            seen = _seen_rows(seq, drafts, device) if cfg.repetition_penalty != 1.0 else None
            a, nxt = verify(process_logits(logits, seen, cfg), drafts, q, cfg, gen)
            drafted, accepted = drafted + len(drafts), accepted + a
            cache.rewind(len(seq) + a)  # keeps seq and the accepted drafts; `nxt` is fed next round
            for tok in [*drafts[:a], nxt]:
                seq.append(tok)
                produced += 1
                if tok in eos:
                    finish = "eos"
                    stream.finish()
                elif stream.push(tok):
                    finish = "stop"
                if on_text is not None:
                    piece, _ = stream.take()
                    if piece:
                        on_text(piece)
                if finish or produced == new:
                    break
            if drafter is not None:
                drafter.keep(len(seq))
        stream.finish()
        piece, _ = stream.take()
        if on_text is not None and piece:
            on_text(piece)
        return Generation(prompt=prompt, text=stream.text, token_ids=stream.ids, finish_reason=finish or "length",
                          context_full=not finish and new < cfg.max_new_tokens,
                          decode_seconds=time.perf_counter() - t0, drafted=drafted, accepted=accepted,
                          target_forwards=forwards)


def _seen_rows(seq: list[int], drafts: list[int], device: torch.device) -> Tensor:
    """(k + 1, S) tokens before each verified position, for the repetition penalty: row i is seq + drafts[:i],
    padded with seq's last token (already present, so the padding changes nothing)."""
    k = len(drafts)
    rows = [seq + drafts[:i] + [seq[-1]] * (k - i) for i in range(k + 1)]
    return torch.tensor(rows, device=device)
