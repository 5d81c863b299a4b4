"""Decoder-only language model: GPT-2 and Llama flavours from one class, chosen by `ModelConfig.arch`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.model.layers import Block, KVCache, Rotary, Transformer, attention_mask, make_norm
from llmkit.model.loss import linear_cross_entropy


@dataclass
class DecoderOutput:
    logits: Tensor | None  # (B, T, padded vocab); None when a loss was asked for instead
    hidden: Tensor  # (B, T, C) after the final norm
    attentions: list[Tensor] | None = None  # per layer (B, nh, T, Tk) when asked for
    loss: Tensor | None = None  # mean next-token cross-entropy when labels were given
    # The residual stream when asked for: n_layer + 1 tensors (B, T, C), the embeddings' output then each
    # block's, before the final norm (the logit lens puts each through that norm and the head).
    hidden_states: list[Tensor] | None = None


class DecoderLM(Transformer):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        V, C = cfg.padded_vocab_size, cfg.n_embd
        self.embed = nn.Embedding(V, C)
        self.pos_embed = nn.Embedding(cfg.block_size, C) if cfg.arch == "gpt2" else None
        self.rotary = (Rotary(cfg.head_dim, cfg.block_size, cfg.rope_theta, cfg.rope_scaling)
                       if cfg.arch == "llama" else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal=True) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(C, V, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights(scaled_residuals=True)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask_2d: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
        logits_slice: slice | None = None,
        labels: Tensor | None = None,
        need_hidden: bool = False,
    ) -> DecoderOutput:
        """input_ids (B, T). `attention_mask_2d` (B, Tk) marks real tokens (0 = left padding) over the cached
        and new positions together. `logits_slice` limits the head to some positions (decoding needs only the
        last one, which saves a (B, T, V) matmul on the prompt). With `labels` (B, T) the head and the
        cross-entropy run fused and chunked (model/loss.py) and only the loss comes back: training's path.
        `need_weights` / `need_hidden` return every layer's attention weights / residual stream (interpretability)."""
        B, T = input_ids.shape
        past = cache.pos if cache is not None else 0
        if position_ids is None:
            if attention_mask_2d is not None:  # left padding: each row counts from its first real token
                position_ids = (attention_mask_2d.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids)  # (B, T, C)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        else:
            rope = self.rotary(position_ids, past + T)
        x = self.drop(x)
        mask = attention_mask(attention_mask_2d, T, past + T, causal=True, device=x.device)
        attentions = [] if need_weights else None
        hidden_states = [x] if need_hidden else None
        for i, block in enumerate(self.blocks):
            x, w = block(x, rope=rope, mask=mask, cache=cache, layer=i, need_weights=need_weights)
            if attentions is not None:
                attentions.append(w)
            if hidden_states is not None:
                hidden_states.append(x)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)  # (B, T, C)
        if labels is not None:
            # Over the real vocabulary only: the padding rows are not tokens, and `llmkit eval` scores the same way.
            loss = linear_cross_entropy(x, self.lm_head.weight[: self.cfg.vocab_size], labels)
            return DecoderOutput(logits=None, hidden=x, attentions=attentions, loss=loss, hidden_states=hidden_states)
        h = x if logits_slice is None else x[:, logits_slice]
        return DecoderOutput(logits=self.lm_head(h), hidden=x, attentions=attentions, hidden_states=hidden_states)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.embed.weight
        return KVCache(self.cfg, batch, max_len, p.device, p.dtype)
