"""Encoder–decoder Transformer (`arch: mbart`) for text-to-text: an encoder reads the source, a decoder writes the
target while cross-attending to the encoder's output.

It is built from the same blocks as the decoder-only and encoder models (`layers.Block`: one Attention, one MLP,
one norm); the decoder's blocks add a cross-attention step (`Block(cross=True)`), whose keys/values come from the
encoder output through the same fused `qkv` weights (`Attention.project_kv`).

Why mBART's layout among the Hugging Face encoder–decoders: its blocks are llmkit's gpt2 blocks — pre-LayerNorm
(x + f(norm(x))), learned absolute positions, linear layers with biases, a plain GELU MLP. BART and Marian
normalise after the residual add (post-norm, harder to train from scratch without warmup tricks), Marian uses
sinusoidal positions, T5 uses RMSNorm without biases and relative position buckets (a new attention bias). So
mBART maps tensor for tensor through `interop/hf.py`'s table, and a converted folder loads into
`MBartForConditionalGeneration`. Its quirks, kept so the weights map one to one:
- positions are looked up at position + 2 (fairseq's padding offset): the position tables have block_size + 2
  rows and the first two are never used;
- a LayerNorm right after the embeddings (`*_embed_norm`, HF's `layernorm_embedding`) and one after the last
  block of each stack (`enc_norm`, `dec_norm`);
- one token embedding shared by encoder, decoder and (tied) output head; no embedding scale (`scale_embedding:
  false`) and a zero `final_logits_bias` on export.

Token conventions (BART's): the encoder reads `source_ids` = tokens + eos; the decoder is trained on
`target_ids` = tokens + eos and starts from `decoder_start_id` = eos; padding is on the right (mask 0, label -100).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.model import layers
from llmkit.model.layers import Block, KVCache, Transformer, make_norm
from llmkit.model.loss import IGNORE_INDEX, linear_cross_entropy

POSITION_OFFSET = 2  # mBART looks positions up at index position + 2


class SpecialIds(Protocol):
    """What the token conventions need from a tokenizer (llmkit's `Tokenizer` has them)."""

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...


def source_ids(tok: SpecialIds, text: str) -> list[int]:
    """Encoder input of a source text: its tokens, then eos (the encoder sees where the text ends)."""
    return [*tok.encode(text), tok.eos_id]


def target_ids(tok: SpecialIds, text: str) -> list[int]:
    """Labels of a target text: its tokens, then eos (the decoder learns to stop)."""
    return [*tok.encode(text), tok.eos_id]


def decoder_start_id(tok: SpecialIds) -> int:
    """The token the decoder starts from: eos, as BART/mBART's `decoder_start_token_id` (no extra token needed)."""
    return tok.eos_id


def shift_right(labels: Tensor, start_id: int, pad_id: int) -> Tensor:
    """Teacher forcing's decoder inputs: (B, T) labels -> (B, T) [start, labels[:-1]], ignored (-100) -> pad.

    The decoder at position t sees the target up to t - 1 and predicts labels[t]."""
    out = labels.new_full(labels.shape, pad_id)  # (B, T)
    out[:, 1:] = labels[:, :-1]
    out[:, 0] = start_id
    return out.masked_fill(out == IGNORE_INDEX, pad_id)


@dataclass
class Seq2SeqOutput:
    logits: Tensor | None  # (B, T, padded vocab); None when a loss was asked for instead
    hidden: Tensor  # (B, T, C) decoder states after the final norm
    loss: Tensor | None = None  # mean (label-smoothed) cross-entropy over labels != -100


@dataclass
class CrossMemory:
    """What the decoder reads from the encoder, computed once per source batch: each decoder block's cross
    keys/values (B, nkv, S, hs) and the source padding mask as (B, 1, 1, S) bool (True = real token)."""

    kv: list[tuple[Tensor, Tensor]]
    mask: Tensor

    def select(self, rows: Tensor) -> CrossMemory:
        """Rows in this order (repeats allowed): a beam search expands each source to its beams."""
        return CrossMemory([(k[rows], v[rows]) for k, v in self.kv], self.mask[rows])


class Seq2SeqLM(Transformer):
    """mBART-shaped encoder–decoder: `encode` once, then `decode` with teacher forcing or one token at a time."""

    lookup_tables = ("enc_pos_embed", "dec_pos_embed")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        V, C, P = cfg.padded_vocab_size, cfg.n_embd, cfg.block_size + POSITION_OFFSET
        self.embed = nn.Embedding(V, C)  # shared by encoder, decoder and (tied) head
        self.drop = nn.Dropout(cfg.dropout)
        self.enc_pos_embed = nn.Embedding(P, C)
        self.enc_embed_norm = make_norm(cfg)
        self.enc_blocks = nn.ModuleList(Block(cfg, causal=False) for _ in range(cfg.n_encoder_layer))
        self.enc_norm = make_norm(cfg)
        self.dec_pos_embed = nn.Embedding(P, C)
        self.dec_embed_norm = make_norm(cfg)
        self.dec_blocks = nn.ModuleList(Block(cfg, causal=True, cross=True) for _ in range(cfg.n_layer))
        self.dec_norm = make_norm(cfg)
        self.lm_head = nn.Linear(C, V, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights(scaled_residuals=True)

    def flops_per_token(self, seq_len: int | None = None, head_share: float = 1.0,
                        shares: dict[int, float] | None = None, source_share: float = 0.5) -> float:
        """Training FLOPs per token of a pair batch (source and target tokens counted together): the encoder
        runs on the source tokens (`source_share` of them), the decoder and the head on the target tokens. Counting
        every weight for every token, as a decoder-only model may, would double the figure (an MFU over 100 %)."""
        enc = [self.enc_pos_embed, self.enc_embed_norm, self.enc_blocks, self.enc_norm]
        dec = [self.dec_pos_embed, self.dec_embed_norm, self.dec_blocks, self.dec_norm]
        split = {id(m): source_share for m in enc} | {id(m): 1.0 - source_share for m in dec}
        split[id(self.lm_head)] = (1.0 - source_share) * head_share
        return super().flops_per_token(seq_len, head_share, split | (shares or {}))

    def _embed(self, ids: Tensor, start: int, pos: nn.Embedding, norm: nn.Module) -> Tensor:
        """Token + learned position (counted from `start`, mBART's +2 offset), normalised: (B, T) -> (B, T, C)."""
        T = ids.shape[1]
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's {self.cfg.block_size} "
                             "positions")
        positions = torch.arange(start + POSITION_OFFSET, start + T + POSITION_OFFSET, device=ids.device)  # (T,)
        return self.drop(norm(self.embed(ids) + pos(positions)))  # (B, T, C)

    def encode(self, input_ids: Tensor, attention_mask_2d: Tensor | None = None) -> Tensor:
        """(B, S) source ids, right-padded, with (B, S) mask (1 = real token) -> (B, S, C) encoder output."""
        x = self._embed(input_ids, 0, self.enc_pos_embed, self.enc_embed_norm)  # (B, S, C)
        S = input_ids.shape[1]
        mask = layers.attention_mask(attention_mask_2d, S, S, causal=False, device=x.device)  # (B, 1, S, S) or None
        for block in self.enc_blocks:
            x, _ = block(x, mask=mask)
        return self.enc_norm(x)  # (B, S, C)

    def memory(self, encoded: Tensor, attention_mask_2d: Tensor | None = None) -> CrossMemory:
        """The encoder output as every decoder block's cross keys/values: projected once per source batch."""
        B, S, _ = encoded.shape
        if attention_mask_2d is None:
            attention_mask_2d = torch.ones(B, S, dtype=torch.bool, device=encoded.device)
        mask = attention_mask_2d.bool()[:, None, None, :]  # (B, 1, 1, S)
        return CrossMemory([block.cross_attn.project_kv(encoded) for block in self.dec_blocks], mask)

    def decode(self, decoder_input_ids: Tensor, memory: CrossMemory, cache: KVCache | None = None) -> Tensor:
        """(B, T) decoder inputs -> (B, T, C) states after the final norm. With a `cache` the inputs continue
        what it holds (decoding one token at a time), else they start at position 0 (teacher forcing)."""
        past = cache.pos if cache is not None else 0
        x = self._embed(decoder_input_ids, past, self.dec_pos_embed, self.dec_embed_norm)  # (B, T, C)
        for i, block in enumerate(self.dec_blocks):
            x, _ = block(x, cache=cache, layer=i, memory_kv=memory.kv[i], memory_mask=memory.mask)
        if cache is not None:
            cache.advance(decoder_input_ids.shape[1])
        return self.dec_norm(x)  # (B, T, C)

    def logits(self, hidden: Tensor) -> Tensor:
        """(B, T, C) decoder states -> (B, T, V) logits over the real vocabulary (padding rows dropped)."""
        return self.lm_head(hidden)[..., : self.cfg.vocab_size]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor,
                labels: Tensor | None = None, label_smoothing: float = 0.0) -> Seq2SeqOutput:
        """Teacher forcing: (B, S) sources with their (B, S) mask, (B, T) decoder inputs (`shift_right(labels)`).

        With `labels` (B, T) (-100 = no target) only the loss comes back: the head and cross-entropy run fused
        and chunked (model/loss.py) unless label smoothing needs the full logits. Without, (B, T, V) logits."""
        memory = self.memory(self.encode(input_ids, attention_mask), attention_mask)
        hidden = self.decode(decoder_input_ids, memory)  # (B, T, C)
        if labels is None:
            return Seq2SeqOutput(logits=self.logits(hidden), hidden=hidden)
        if label_smoothing == 0.0:
            loss = linear_cross_entropy(hidden, self.lm_head.weight[: self.cfg.vocab_size], labels)
        else:
            logits = self.logits(hidden).float()  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   label_smoothing=label_smoothing)
        return Seq2SeqOutput(logits=None, hidden=hidden, loss=loss)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """The decoder's self-attention cache (n_layer decoder blocks); cross keys/values live in CrossMemory."""
        p = self.embed.weight
        return KVCache(self.cfg, batch, max_len, p.device, p.dtype)
