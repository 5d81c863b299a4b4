"""Decoding for the encoder–decoder (model/seq2seq.py): greedy, sampling and beam search, batched over sources.

The encoder runs once per batch of sources, and each decoder block's cross-attention keys/values are projected
from its output once (`Seq2SeqLM.memory`); every decoding step then runs the decoder on one new token per row with
its self-attention KV cache. Sources are sorted by length before batching (less padding), results come back in
the caller's order.

No silent cap: `max_new_tokens` is required, and it must fit the decoder's positions (`model.block_size`) or it is
an error. A hypothesis that reaches it without eos ends with `finish_reason="length"`, so callers can count and
report truncated outputs (HF `Seq2SeqTrainer`'s default `max_length=20` cut outputs without a word).

Beam search keeps `beam` hypotheses per source, scored by log-probability / length ** length_penalty (length
counts the generated tokens with eos; 0 = raw log-probability, > 0 favours longer outputs). A source stops when
`beam` hypotheses have ended (`early_stopping=True`, HF's `early_stopping=True`) or, with False, when no running
hypothesis can still beat the worst finished one. Hypotheses still running at `max_new_tokens` compete too,
flagged "length".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import ConfigError, DataError
from llmkit.infer.generate import SamplingConfig, new_generator, pick, process_logits
from llmkit.infer.step import decode_layout
from llmkit.model.seq2seq import CrossMemory, Seq2SeqLM, decoder_start_id, source_ids


@dataclass
class Seq2SeqGeneration:
    source: str
    text: str  # the decoded output, eos and other special tokens left out
    token_ids: list[int]  # the generated tokens, without the final eos
    finish_reason: str  # "eos", or "length": max_new_tokens was reached first (the output may be cut)
    logprob: float  # the model's log-probability of token_ids (+ eos when it ended so), whatever the sampling
    score: float  # what picked it: logprob / length ** length_penalty for beam search, else logprob


@torch.inference_mode()
def seq2seq_decode(model: Seq2SeqLM, tokenizer: Tokenizer, sources: list[str], *, max_new_tokens: int,
                   beam: int = 1, length_penalty: float = 1.0, early_stopping: bool = True, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                   max_source_tokens: int | None = None, progress: bool = False) -> list[Seq2SeqGeneration]:
    """Rewrite each source. `temperature` 0 is greedy; > 0 samples (with top-k / top-p, seeded); `beam` > 1 is
    beam search (deterministic: temperature must be 0). Sources longer than the encoder's context (or
    `max_source_tokens`) are refused, naming the example, before any work is done."""
    cfg = model.cfg
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed)  # validates the sampling values with the same messages as `generate`
    if beam < 1:
        raise ConfigError(f"--beam must be at least 1, got {beam}")
    if beam > 1 and temperature != 0:
        raise ConfigError(f"beam search (--beam {beam}) is deterministic: use --temperature 0 with it, or --beam 1 "
                          "to sample")
    if max_new_tokens > cfg.block_size:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} is more than the decoder's {cfg.block_size} positions "
                          "(model.block_size)")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    limit = cfg.block_size if max_source_tokens is None else max_source_tokens
    if not 1 <= limit <= cfg.block_size:
        raise ConfigError(f"max_source_tokens must be in [1, {cfg.block_size}] (the encoder's context), got {limit}")
    encoded = [source_ids(tokenizer, s) for s in sources]
    for i, ids in enumerate(encoded):
        if len(ids) > limit:
            raise DataError(f"source {i}: {len(ids)} tokens (with eos) is longer than the encoder's context of "
                            f"{limit} tokens")
    model.eval()
    decode_layout(model)
    device = next(model.parameters()).device
    gen = new_generator(sampling, device)
    order = sorted(range(len(sources)), key=lambda i: len(encoded[i]))
    results: list[Seq2SeqGeneration | None] = [None] * len(sources)
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for rows in tqdm(batches, desc="decoding", unit="batch", disable=not progress):
        memory = _encode(model, [encoded[i] for i in rows], tokenizer.pad_id, device)
        if beam == 1:
            found = _greedy_or_sample(model, memory, decoder_start_id(tokenizer), tokenizer.eos_id, sampling, gen)
        else:
            found = _beam_search(model, memory, decoder_start_id(tokenizer), tokenizer.eos_id, max_new_tokens, beam,
                                 length_penalty, early_stopping)
        for i, (ids, ended, logprob, score) in zip(rows, found):
            results[i] = Seq2SeqGeneration(source=sources[i], text=tokenizer.decode(ids, skip_special_tokens=True),
                                           token_ids=ids, finish_reason="eos" if ended else "length",
                                           logprob=logprob, score=score)
    return results  # type: ignore[return-value]


def seq2seq_generate(model: Seq2SeqLM, tokenizer: Tokenizer, sources: list[str], *, max_new_tokens: int,
                     beam: int = 1, length_penalty: float = 1.0, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                     max_source_tokens: int | None = None) -> list[str]:
    """The outputs' texts only (`seq2seq_decode` also says which ones reached max_new_tokens)."""
    return [g.text for g in seq2seq_decode(model, tokenizer, sources, max_new_tokens=max_new_tokens, beam=beam,
                                           length_penalty=length_penalty, temperature=temperature, top_k=top_k,
                                           top_p=top_p, seed=seed, batch_size=batch_size,
                                           max_source_tokens=max_source_tokens)]


def _encode(model: Seq2SeqLM, rows: list[list[int]], pad_id: int, device: torch.device) -> CrossMemory:
    """Right-padded sources -> the decoder's cross-attention memory (encoder run once)."""
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    ids, mask = ids.to(device), mask.to(device)
    return model.memory(model.encode(ids, mask), mask)


Found = tuple[list[int], bool, float, float]  # tokens (no eos), ended with eos, log-probability, score


def _greedy_or_sample(model: Seq2SeqLM, memory: CrossMemory, start: int, eos: int, sampling: SamplingConfig,
                      gen: torch.Generator | None) -> list[Found]:
    """One hypothesis per source; finished rows leave the batch (their cache and memory rows are dropped)."""
    B = memory.mask.shape[0]
    device = memory.mask.device
    cache = model.new_cache(B, sampling.max_new_tokens)
    alive = torch.arange(B, device=device)  # original row of each row still decoding
    tokens: list[list[int]] = [[] for _ in range(B)]
    logprob, ended = [0.0] * B, [False] * B
    step = torch.full((B, 1), start, dtype=torch.long, device=device)  # (B, 1)
    for _ in range(sampling.max_new_tokens):
        logits = model.logits(model.decode(step, memory, cache)[:, -1]).float()  # (b, V)
        nxt = pick(process_logits(logits, None, sampling), sampling, gen)  # (b,)
        lp = logits.log_softmax(-1).gather(1, nxt[:, None]).squeeze(1)  # (b,)
        keep = []
        for j, (row, tok, p) in enumerate(zip(alive.tolist(), nxt.tolist(), lp.tolist())):
            logprob[row] += p
            if tok == eos:
                ended[row] = True
            else:
                tokens[row].append(tok)
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(alive):
            sel = torch.tensor(keep, device=device)
            alive, nxt = alive[sel], nxt[sel]
            cache.select(sel)
            memory = memory.select(sel)
        step = nxt[:, None]
    return [(tokens[i], ended[i], logprob[i], logprob[i]) for i in range(B)]


def _beam_search(model: Seq2SeqLM, memory: CrossMemory, start: int, eos: int, max_new: int, K: int,
                 length_penalty: float, early_stopping: bool) -> list[Found]:
    """`K` hypotheses per source, all sources of the batch in one (B*K)-row decoder pass per step."""
    B = memory.mask.shape[0]
    device = memory.mask.device
    memory = memory.select(torch.arange(B, device=device).repeat_interleave(K))  # (B*K) rows, source-major
    cache = model.new_cache(B * K, max_new)
    # Only the first beam of each source is live at first, so the first step does not pick K copies of one token.
    scores = torch.full((B, K), -math.inf, device=device)  # (B, K) summed log-probabilities
    scores[:, 0] = 0.0
    seqs = torch.full((B, K, 0), start, dtype=torch.long, device=device)  # (B, K, t) generated so far
    finished: list[list[tuple[float, list[int], float, bool]]] = [[] for _ in range(B)]  # (score, ids, lp, eos)
    done = [False] * B
    step = torch.full((B * K, 1), start, dtype=torch.long, device=device)  # (B*K, 1)
    for t in range(max_new):
        logp = model.logits(model.decode(step, memory, cache)[:, -1]).float().log_softmax(-1)  # (B*K, V)
        V = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)  # (B, K*V)
        top, idx = cand.topk(2 * K, dim=-1)  # (B, 2K): enough that K continue even if K end in eos
        origin, token = idx // V, idx % V  # (B, 2K)
        next_scores = torch.full((B, K), -math.inf, device=device)
        next_origin = torch.zeros((B, K), dtype=torch.long, device=device)
        next_token = torch.full((B, K), eos, dtype=torch.long, device=device)
        for b in range(B):
            if done[b]:
                continue
            kept = 0
            for s, o, tok in zip(top[b].tolist(), origin[b].tolist(), token[b].tolist()):
                if s == -math.inf:
                    break
                if tok == eos:
                    if len(finished[b]) < K or s / (t + 1) ** length_penalty > finished[b][-1][0]:
                        finished[b].append((s / (t + 1) ** length_penalty, seqs[b, o].tolist(), s, True))
                        finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
                    continue
                next_scores[b, kept], next_origin[b, kept], next_token[b, kept] = s, o, tok
                kept += 1
                if kept == K:
                    break
            done[b] = _source_done(finished[b], next_scores[b].max().item(), K, t + 1, max_new, length_penalty,
                                   early_stopping)
        if all(done) or t == max_new - 1:
            break
        rows = (torch.arange(B, device=device)[:, None] * K + next_origin).view(-1)  # (B*K,) beams' parents
        cache.select(rows)
        seqs = torch.cat([seqs.view(B * K, -1)[rows].view(B, K, -1), next_token[:, :, None]], dim=-1)
        scores = next_scores
        step = next_token.view(B * K, 1)
    out: list[Found] = []
    for b in range(B):
        hyps = list(finished[b])
        if not done[b]:  # still running at max_new_tokens: they compete, flagged as cut
            for k in range(K):
                s = next_scores[b, k].item()
                if s > -math.inf:
                    ids = seqs[b, next_origin[b, k]].tolist() + [next_token[b, k].item()]
                    hyps.append((s / (t + 1) ** length_penalty, ids, s, False))
        score, ids, lp, ended = max(hyps, key=lambda h: h[0])
        out.append((ids, ended, lp, score))
    return out


def _source_done(finished: list, best_running: float, K: int, length: int, max_new: int, length_penalty: float,
                 early_stopping: bool) -> bool:
    """Whether a source's search can stop: K hypotheses ended and (unless `early_stopping`) no running one can
    still score higher than the worst of them. A running sum of log-probabilities only falls; its best possible
    score is at the longest length when length_penalty > 0, else at the next token."""
    if best_running == -math.inf:
        return True
    if len(finished) < K:
        return False
    if early_stopping:
        return True
    best_len = max_new if length_penalty > 0 else length + 1
    return best_running / best_len ** length_penalty <= finished[-1][0]
