"""An LSTM language model (`model.arch: lstm`): the recurrent baseline in the seeds' history, n-gram -> LSTM ->
Transformer.

It is an ordinary llmkit model so that the same code paths serve it as the Transformer: `llmkit pretrain` trains it
with the one loop on the same token shards (objective `causal_lm`), `llmkit eval` scores it in bits per byte,
`llmkit generate` continues prompts. Hence the DecoderLM interface: `forward(input_ids, ..., labels=...)` returning
a `DecoderOutput`, an `lm_head` the fused loss reads, `new_cache` for decoding (here the recurrent state (h, c)
instead of keys and values).

The shape follows the classic word-level LSTM LMs (Zaremba et al. 2014; Merity et al.'s AWD-LSTM without its
regularisers): token embedding -> `torch.nn.LSTM` (`n_layer` layers, `n_embd` units, dropout between layers) ->
output head tied to the embedding (Press & Wolf 2017). The forget-gate biases start at 1 (Jozefowicz et al. 2015)
so early training does not forget everything. Config keys that describe attention (n_head, rope_theta, ...) are
unused; `block_size` is the training window (backpropagation through time over that many tokens; `llmkit eval`
scores windows of that length, each from a zero state, as it does for the Transformer).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError
from llmkit.model.decoder import DecoderOutput
from llmkit.model.layers import Transformer
from llmkit.model.loss import linear_cross_entropy


class LSTMState:
    """The decoding state of an LSTM: (h, c) per layer, and how many tokens it has read (generation's `pos`)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (cfg.n_layer, batch, cfg.n_embd)
        self.h = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, C)
        self.c = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, C)
        self.pos = 0
        self.max_len = max_len

    def advance(self, t: int) -> None:
        self.pos += t

    def select(self, rows: Tensor) -> None:
        """Keep only the batch rows in `rows`."""
        self.h, self.c = self.h[:, rows], self.c[:, rows]


class LSTMLM(Transformer):
    """Embedding -> multi-layer LSTM -> tied output head. (Transformer gives the parameter and FLOP counts: every
    LSTM weight is used once per token and layer, so the generic 6N-per-token count is right.)"""

    lookup_tables = ()

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        V, C = cfg.padded_vocab_size, cfg.n_embd
        self.embed = nn.Embedding(V, C)
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(C, C, num_layers=cfg.n_layer, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.lm_head = nn.Linear(C, V, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights(scaled_residuals=False)  # N(0, 0.02) embedding/head; the LSTM keeps PyTorch's init
        with torch.no_grad():
            for name, p in self.lstm.named_parameters():
                if name.startswith("bias_ih"):
                    p[C:2 * C].fill_(1.0)  # gates are ordered i, f, g, o: the forget gate's bias

    def forward(
        self,
        input_ids: Tensor,
        attention_mask_2d: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: LSTMState | None = None,
        need_weights: bool = False,
        logits_slice: slice | None = None,
        labels: Tensor | None = None,
        need_hidden: bool = False,
    ) -> DecoderOutput:
        """input_ids (B, T); the other arguments mean what they mean for DecoderLM. `attention_mask_2d` (B, Tk)
        marks real tokens over the cached and new positions: a padded position leaves a row's state unchanged, so a
        left-padded row computes what it would alone. Positions are implicit in an RNN (`position_ids` unused)."""
        if need_weights or need_hidden:
            raise ConfigError("an LSTM has no attention weights or per-layer residual stream to show; "
                              "`llmkit explain` needs a Transformer")
        B, T = input_ids.shape
        x = self.drop(self.embed(input_ids))  # (B, T, C)
        state = (cache.h, cache.c) if cache is not None else None
        past = cache.pos if cache is not None else 0
        mask = attention_mask_2d[:, past:past + T] if attention_mask_2d is not None else None
        if mask is None or bool(mask.all()):
            y, (h, c) = self.lstm(x, state)  # (B, T, C)
        else:  # padded rows: one step at a time, keeping the state where the position is padding
            y, (h, c) = self._masked(x, mask.bool(), state)
        if cache is not None:
            cache.h, cache.c = h, c
            cache.advance(T)
        y = self.drop(y)
        if labels is not None:
            loss = linear_cross_entropy(y, self.lm_head.weight[: self.cfg.vocab_size], labels)
            return DecoderOutput(logits=None, hidden=y, loss=loss)
        h_out = y if logits_slice is None else y[:, logits_slice]
        return DecoderOutput(logits=self.lm_head(h_out), hidden=y)

    def _masked(self, x: Tensor, mask: Tensor, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple]:
        """x (B, T, C), mask (B, T) -> outputs (B, T, C) and the final (h, c), skipping padded positions."""
        B, T, C = x.shape
        if state is None:
            zeros = x.new_zeros(self.cfg.n_layer, B, C)  # (L, B, C)
            state = (zeros, zeros.clone())
        h, c = state
        outs = []
        for t in range(T):
            y, (h2, c2) = self.lstm(x[:, t:t + 1], (h, c))  # (B, 1, C)
            keep = mask[:, t][None, :, None]  # (1, B, 1)
            h, c = torch.where(keep, h2, h), torch.where(keep, c2, c)
            outs.append(y)
        return torch.cat(outs, dim=1), (h, c)

    def new_cache(self, batch: int, max_len: int) -> LSTMState:
        p = self.embed.weight
        return LSTMState(self.cfg, batch, max_len, p.device, p.dtype)
