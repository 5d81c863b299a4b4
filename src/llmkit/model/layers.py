"""The building blocks every llmkit Transformer shares: norms, rotary positions, attention, MLPs, KV cache.

There is one attention implementation. It runs `F.scaled_dot_product_attention` (flash / memory-efficient
kernels where the device has them) unless the caller asks for the attention weights, in which case it takes the
eager path that materialises them (interpretability needs those; the math is the same).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.config import ModelConfig


class Transformer(nn.Module):
    """What every llmkit Transformer shares: its config, the GPT-2/BERT weight init, parameter and FLOP counts.

    Subclasses build their modules, then call `init_weights()`."""

    cfg: ModelConfig
    # Embedding tables that only look rows up (no matmul): left out of the FLOP count, as nanoGPT/PaLM do.
    lookup_tables: tuple[str, ...] = ("pos_embed",)
    # Output heads, run per token only as the objective needs (FLOP count's `head_share`), and per-text modules.
    heads: tuple[str, ...] = ("lm_head", "mlm")
    per_text: tuple[str, ...] = ("pooler", "nsp")

    def init_weights(self, scaled_residuals: bool) -> None:
        """N(0, 0.02) for matrices and embeddings, zero biases (norms keep their ones). With `scaled_residuals`,
        GPT-2's depth scaling: residual projections get std 0.02 / sqrt(2 * n_layer) so the stream's variance
        stays put however deep the model is."""
        def init(module: nn.Module) -> None:
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

        self.apply(init)  # children first, in registration order: the same draws as before this was shared
        if scaled_residuals:
            for name, p in self.named_parameters():
                if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layer))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (tied ones once); `non_embedding` leaves out the lookup-only tables (positions, types)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(m.weight.numel() for name in self.lookup_tables if (m := getattr(self, name, None)) is not None)
        return n

    def flops_per_token(self, seq_len: int | None = None, head_share: float = 1.0,
                        shares: dict[int, float] | None = None) -> float:
        """Training FLOPs per token for what actually runs and learns: PaLM's 6N + 12·L·H·Q·T (appendix B) when
        every weight trains and the head runs on every token, less when some are frozen or idle.

        Walking the modules in forward (registration) order, each parameter costs 2 FLOPs per token forward,
        2 more backward for its input's gradient once a trainable parameter lies upstream (the gradient must flow
        through it to get there), and 2 more for its own gradient if it trains: 6 trained, 4 frozen above an
        adapter (LoRA), 2 frozen below every trainable one. Lookup tables (embeddings) cost nothing; a tied
        output head is a matmul and counts. Norm gains and biases count like weights, as in 6N (under 1 %). The
        output head (`heads`) runs on `head_share` of the tokens: 1 for causal LM, the mask rate for MLM, 0 for
        classification (it pools hidden states); per-text modules (`per_text`: pooler, NSP) are left out.
        Attention scores (QK^T and AV over the full T x T, as nanoGPT and PaLM count them) cost 4·H·Q·T per
        layer forward and twice that backward once the gradient flows there. `shares` (module id -> fraction of
        the tokens it runs on) covers models whose parts see different tokens: an encoder–decoder's encoder
        reads the source tokens, its decoder the target tokens."""
        T = seq_len or self.cfg.block_size
        scores = 4 * self.cfg.n_head * self.cfg.head_dim * T  # QK^T and AV, per token and layer, forward
        share = {id(m): head_share for n in self.heads if (m := getattr(self, n, None)) is not None}
        share |= {id(m): 0.0 for n in self.per_text if (m := getattr(self, n, None)) is not None}
        share |= shares or {}
        total, flows = 0.0, False

        def walk(module: nn.Module, scale: float) -> None:
            nonlocal total, flows
            scale = share.get(id(module), scale)
            if isinstance(module, Attention):  # the scores sit between the qkv and the output projection
                walk(module.qkv, scale)
                total += scale * scores * (3 if flows else 1)
                walk(module.proj, scale)
                return
            own = list(module.parameters(recurse=False))
            if not isinstance(module, nn.Embedding):
                total += scale * sum(p.numel() * (2 + 2 * flows + 2 * p.requires_grad) for p in own)
            flows |= bool(scale) and any(p.requires_grad for p in own)
            for child in module.children():
                walk(child, scale)

        walk(self, 1.0)
        return total


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "llama":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class Rotary(nn.Module):
    """Rotary position embedding tables (the Hugging Face "rotate half" layout, so Llama weights load as-is)."""

    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self._build(max_len)

    def _build(self, max_len: int) -> None:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
        if self.scaling is not None:
            inv_freq = scale_inv_freq(inv_freq, self.scaling)  # (hs/2,)
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, position_ids: Tensor, max_pos: int) -> tuple[Tensor, Tensor]:
        """(B, T) positions, all below `max_pos` -> cos, sin of shape (B, 1, T, hs), ready to broadcast over heads.

        `max_pos` comes from the caller (it knows the cache length) so no device sync is needed to check it."""
        if max_pos > self.cos.shape[0]:  # longer than planned: grow the table rather than fail
            device = self.cos.device
            self._build(max(max_pos, 2 * self.cos.shape[0]))
            self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def scale_inv_freq(inv_freq: Tensor, scaling: dict) -> Tensor:
    """Long-context rotary scaling, as transformers computes it (`rope_type` linear or llama3).

    linear divides every frequency by `factor`. llama3 (Llama 3.1/3.2) leaves high frequencies alone, divides
    low ones (wavelength longer than the original context / low_freq_factor) by `factor`, and blends in between;
    without it such checkpoints give wrong logits at every position."""
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq  # (hs/2,)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return (x * cos + rotate_half(x) * sin).to(x.dtype)  # (B, nh, T, hs)


class KVCache:
    """Pre-allocated keys/values for all layers: decoding writes in place, never concatenates."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nkv, Tmax, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already stored
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, nkv, T, hs) new keys/values at the current position; return all keys/values so far."""
        t = k.shape[2]
        if self.pos + t > self.max_len:
            raise ValueError(f"KV cache is full ({self.max_len} positions)")
        self.k[layer, :, :, self.pos:self.pos + t] = k
        self.v[layer, :, :, self.pos:self.pos + t] = v
        return self.k[layer, :, :, :self.pos + t], self.v[layer, :, :, :self.pos + t]

    def advance(self, t: int) -> None:
        self.pos += t

    def rewind(self, pos: int) -> None:
        """Forget everything from position `pos` on (speculative decoding drops rejected draft tokens); the
        entries stay in memory and are overwritten by the next update."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot rewind a KV cache at position {self.pos} to {pos}")
        self.pos = pos

    def select(self, rows: Tensor) -> None:
        """Keep only the batch rows in `rows` (drop finished sequences from a batch)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional rotary positions and a KV cache."""

    def __init__(self, cfg: ModelConfig, causal: bool = True) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.causal = causal
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        need_weights: bool = False,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, T, C); mask (B, 1, T, Tk) bool, True = may attend, or None for the plain causal/full case.

        `kv` makes this cross-attention (an encoder–decoder's decoder): x gives only the queries, the keys and
        values are `project_kv(encoder output)`, computed once per source rather than once per decoded token."""
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        if kv is None:
            q, k, v = self.qkv(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
            k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
            v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        else:
            bias = self.qkv.bias[: nh * hs] if self.qkv.bias is not None else None
            q, (k, v) = F.linear(x, self.qkv.weight[: nh * hs], bias), kv  # (B, T, nh*hs); (B, nkv, S, hs)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, Tk, hs)
        # Grouped-query: each kv head serves nh // nkv query heads. Decoding (a cache) lets SDPA share the heads
        # (`enable_gqa`: the same numbers, without copying the whole cache twice per layer and token); training
        # and the weights path expand them.
        gqa = nkv != nh and cache is not None and not need_weights
        if nkv != nh and not gqa:
            k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, Tk, hs)
            v = v.repeat_interleave(nh // nkv, dim=1)
        # Without a mask, queries are causal only when they see exactly their own keys (training, first prefill);
        # a single decode query attends to everything cached.
        is_causal = mask is None and self.causal and T > 1 and T == k.shape[2]  # T > 1 first: no SymBool in a step
        dropout = self.attn_dropout if self.training else 0.0
        weights = None
        if need_weights:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, Tk)
            if is_causal:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            weights = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)
            y = F.dropout(weights, dropout, self.training) @ v  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                               enable_gqa=gqa)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, C)
        return self.resid_dropout(self.proj(y)), weights

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys/values of an encoder output (B, S, C), with the k/v rows of the one fused `qkv`
        (so the weights keep the self-attention layout and names): each (B, nkv, S, hs)."""
        B, S, _ = memory.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        bias = self.qkv.bias[nh * hs:] if self.qkv.bias is not None else None
        k, v = F.linear(memory, self.qkv.weight[nh * hs:], bias).split([nkv * hs, nkv * hs], dim=-1)
        return k.view(B, S, nkv, hs).transpose(1, 2), v.view(B, S, nkv, hs).transpose(1, 2)  # (B, nkv, S, hs)


class MLP(nn.Module):
    """GPT-2: Linear -> GELU(tanh) -> Linear; BERT and mBART with exact (erf) GELU. Llama: SwiGLU, with gate and up
    projections fused in one matmul."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        self.gelu = "none" if cfg.arch in ("bert", "mbart") else "tanh"
        width = cfg.intermediate_size
        self.fc = nn.Linear(cfg.n_embd, 2 * width if self.swiglu else width, bias=cfg.bias)
        self.proj = nn.Linear(width, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, T, I) or (B, T, 2I)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up  # (B, T, I)
        else:
            h = F.gelu(h, approximate=self.gelu)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    BERT (`arch: bert`) normalises after the residual add instead (post-norm): norm(x + attn(x)), then
    norm(x + mlp(x)); same modules, so one block class serves both and BERT weights load as they are.
    With `cross` (an encoder–decoder's decoder) a third residual step sits between the two: x +
    cross_attn(cross_norm(x)) over the encoder's keys/values `memory_kv`, masked by `memory_mask` (B, 1, 1, S).
    """

    def __init__(self, cfg: ModelConfig, causal: bool = True, cross: bool = False) -> None:
        super().__init__()
        self.post_norm = cfg.arch == "bert"
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, causal=causal)
        self.cross_norm = make_norm(cfg) if cross else None
        self.cross_attn = Attention(cfg, causal=False) if cross else None
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope=None, mask=None, cache=None, layer: int = 0, need_weights: bool = False,
                memory_kv: tuple[Tensor, Tensor] | None = None, memory_mask: Tensor | None = None):
        if self.post_norm:
            a, w = self.attn(x, rope=rope, mask=mask, cache=cache, layer=layer, need_weights=need_weights)
            x = self.norm1(x + a)
            return self.norm2(x + self.mlp(x)), w
        a, w = self.attn(self.norm1(x), rope=rope, mask=mask, cache=cache, layer=layer, need_weights=need_weights)
        x = x + a
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_norm(x), mask=memory_mask, kv=memory_kv)[0]
        x = x + self.mlp(self.norm2(x))
        return x, w


def attention_mask(
    pad_mask: Tensor | None, q_len: int, k_len: int, causal: bool, device: torch.device
) -> Tensor | None:
    """Boolean (B, 1, Tq, Tk) mask from a (B, Tk) key-validity mask; None when SDPA's own flags suffice.

    Queries are the last `q_len` of the `k_len` positions. A padded query may attend to itself, so no row is
    fully masked (that would give NaN); its output is never used.
    """
    if pad_mask is None and (q_len == k_len or q_len == 1 or not causal):
        return None
    q_idx = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
    k_idx = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    allowed = (k_idx <= q_idx) if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if pad_mask is None:
        return allowed[None, None]  # (1, 1, Tq, Tk)
    allowed = allowed[None] & pad_mask.bool()[:, None, :]  # (B, Tq, Tk)
    allowed = allowed | (k_idx == q_idx)[None]
    return allowed[:, None]  # (B, 1, Tq, Tk)
