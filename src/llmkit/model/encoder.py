"""BERT-style bidirectional encoder with its pre-training heads (masked LM tied to the embeddings, next sentence).

It reuses the decoder's building blocks (`Block(cfg, causal=False)`: the same attention, MLP and norms; `arch:
bert` switches the block to post-LayerNorm and exact GELU), so an encoder is embeddings + blocks + heads and
nothing else. Token embeddings are word + learned position + token type (sentence A/B), normalised before the
first block, as BERT does. Parameter names map to Hugging Face `BertForPreTraining` through `hf.BERT_TABLE`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.model.layers import Block, Transformer, attention_mask


@dataclass
class EncoderOutput:
    hidden: Tensor  # (B, T, C) last block's output (post-norm: already normalised)
    pooled: Tensor  # (B, C) BERT pooler: tanh(W h[CLS] + b)
    logits: Tensor | None = None  # masked-LM logits: (N, V) at `mlm_positions`, or (B, T, V) with all_logits
    nsp_logits: Tensor | None = None  # (B, 2) next-sentence: 0 = B follows A, 1 = B is random (HF convention)
    attentions: list[Tensor] | None = None  # per layer (B, nh, T, T) when asked for
    hidden_states: list[Tensor] | None = None  # n_layer + 1 (B, T, C): embeddings' output, then each block's


class MLMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> decoder (tied to the word embeddings) + bias."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C, V = cfg.n_embd, cfg.padded_vocab_size
        self.dense = nn.Linear(C, C)
        self.norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.decoder = nn.Linear(C, V, bias=False)
        self.bias = nn.Parameter(torch.zeros(V))

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(h)))) + self.bias  # (..., V)


class EncoderLM(Transformer):
    """A BERT: `forward` gives hidden states and the pooled [CLS] vector; the heads run only when asked."""

    lookup_tables = ("pos_embed", "type_embed")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        V, C = cfg.padded_vocab_size, cfg.n_embd
        self.embed = nn.Embedding(V, C)
        self.pos_embed = nn.Embedding(cfg.block_size, C)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, C)
        self.embed_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal=False) for _ in range(cfg.n_layer))
        self.pooler = nn.Linear(C, C)
        self.mlm = MLMHead(cfg)
        self.nsp = nn.Linear(C, 2)
        if cfg.tie_embeddings:
            self.mlm.decoder.weight = self.embed.weight
        self.init_weights(scaled_residuals=False)  # BERT's init: N(0, 0.02), zero biases, unit norms

    def forward(
        self,
        input_ids: Tensor,
        attention_mask_2d: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        need_weights: bool = False,
        mlm_positions: Tensor | None = None,
        all_logits: bool = False,
        need_hidden: bool = False,
    ) -> EncoderOutput:
        """input_ids (B, T); `attention_mask_2d` (B, T) marks real tokens (0 = padding, right or left).

        The masked-LM head runs only on `mlm_positions` (a (B, T) bool mask: pretraining predicts ~15 % of
        tokens, so projecting every position onto the vocabulary would waste most of the head's FLOPs), or on
        every position with `all_logits`. The NSP head is a (C, 2) matmul on the pooled vector and always runs.
        """
        B, T = input_ids.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's {self.cfg.block_size} positions")
        if position_ids is None:
            if attention_mask_2d is not None:  # left padding: each row counts from its first real token
                position_ids = (attention_mask_2d.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
            else:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embed(input_ids) + self.pos_embed(position_ids) + self.type_embed(token_type_ids)  # (B, T, C)
        x = self.drop(self.embed_norm(x))
        mask = attention_mask(attention_mask_2d, T, T, causal=False, device=x.device)  # (B, 1, T, T) or None
        attentions = [] if need_weights else None
        hidden_states = [x] if need_hidden else None
        for i, block in enumerate(self.blocks):
            x, w = block(x, mask=mask, layer=i, need_weights=need_weights)
            if attentions is not None:
                attentions.append(w)
            if hidden_states is not None:
                hidden_states.append(x)
        pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, C)
        logits = None
        if all_logits:
            logits = self.mlm(x)  # (B, T, V)
        elif mlm_positions is not None:
            logits = self.mlm(x[mlm_positions])  # (N, V)
        return EncoderOutput(hidden=x, pooled=pooled, logits=logits, nsp_logits=self.nsp(pooled),
                             attentions=attentions, hidden_states=hidden_states)


def mean_pool(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """Average of the real tokens' states, (B, T, C) -> (B, C): sentence-transformers' pooling."""
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def last_token_pool(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """State of each row's last real token, (B, T, C) -> (B, C): what a causal decoder has read everything by.

    Works for right padding (the last real index is count - 1) and left padding (it is T - 1) alike."""
    B, T, _ = hidden.shape
    if mask is None:
        return hidden[:, -1]
    idx = torch.arange(T, device=hidden.device).expand(B, T)
    last = torch.where(mask.bool(), idx, torch.full_like(idx, -1)).max(dim=1).values.clamp(min=0)  # (B,)
    return hidden[torch.arange(B, device=hidden.device), last]

