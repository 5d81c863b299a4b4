"""Output head + cross-entropy in one pass, chunked over tokens, so the (tokens x vocab) fp32 logits never exist.

With a 50k vocabulary the head's logits dominate training memory traffic: the plain path writes bf16 logits,
an fp32 copy, log-softmax, its gradient and a bf16 copy of that, each tokens x vocab. Here each chunk of tokens
goes matmul -> log-sum-exp -> softmax gradient in one pass over a chunk-sized buffer, and only the gradient of the
logits (in the compute dtype) is kept for the two backward matmuls (the idea of Liger's and Apple's cut
cross-entropy kernels, in plain PyTorch). The loss and gradients equal `F.cross_entropy(h @ W.T, labels)` up to
floating-point rounding.

Under torch.compile the whole pass is traced into the model's one graph (no graph break: the chunk loop unrolls,
its bounds being static shapes); only how the chunks' gradients are joined differs (see `_GradRows`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

IGNORE_INDEX = -100
# Tokens per chunk on a CPU. Each chunk's matmul streams the whole (V, C) head weight (77 MB at 50304 x 384 fp32),
# so small chunks pay in weight reads what they save in logits traffic: 64-token chunks (32 per 2,048-token batch)
# spent 2.58 s per head+loss pass in matmuls on a 2-core AVX2 EPYC, 256-token chunks (51 MB of logits) 1.90 s.
CHUNK = 256
# On a GPU the win is not cache but memory, and many small chunks cost kernel launches: take chunks of about
# 2**27 fp32 logits (512 MB; 2,668 tokens at a 50k vocabulary).
GPU_CHUNK_LOGITS = 2**27


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _chunk_rows(h: Tensor, weight: Tensor) -> int:
    """Tokens per chunk for both fused losses: CHUNK on a CPU, about GPU_CHUNK_LOGITS logits on a GPU."""
    return CHUNK if h.device.type == "cpu" else max(CHUNK, GPU_CHUNK_LOGITS // weight.shape[0])


class _GradRows:
    """The (N, V) gradient of the logits, filled chunk by chunk while each chunk is in cache.

    Eagerly, each chunk is written into one buffer allocated up front. Traced by torch.compile, a slice
    assignment becomes a functional `slice_scatter` of the whole (N, V) buffer per chunk, which Inductor does
    not turn back into an in-place write (it expects to fuse it) — a chain of up to N / CHUNK full-buffer
    passes; so there the chunks are joined by one `cat`, whose inputs Inductor computes straight into their
    rows of the output. The same numbers either way."""

    def __init__(self, n: int, v: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        self.parts: list[Tensor] | None = [] if torch.compiler.is_compiling() else None
        self.buf = None if self.parts is not None else torch.empty(n, v, dtype=dtype, device=device)  # (N, V)

    def put(self, start: int, rows: Tensor) -> None:
        if self.parts is not None:
            self.parts.append(rows.to(self.dtype))  # (n, V)
        else:
            self.buf[start:start + rows.shape[0]] = rows  # type: ignore[index]

    def done(self) -> Tensor:
        return torch.cat(self.parts) if self.parts is not None else self.buf  # type: ignore[return-value]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        # h (N, C) hidden states, weight (V, C) output head, labels (N,) with IGNORE_INDEX for no target
        dtype = compute_dtype(h.device.type, h.dtype)
        hc, wc = h.to(dtype), weight.to(dtype)
        n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1)
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        g_logits = _GradRows(h.shape[0], weight.shape[0], dtype, h.device) if grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        chunk = _chunk_rows(h, weight)
        for s in range(0, h.shape[0], chunk):
            lab = labels[s:s + chunk]
            ok = lab != IGNORE_INDEX  # (n,)
            safe = lab.clamp(min=0)[:, None]  # (n, 1)
            logits = (hc[s:s + chunk] @ wc.T).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
            total += ((lse.squeeze(1) - logits.gather(1, safe).squeeze(1)) * ok).sum()
            if grad:  # d loss / d logits = (softmax - onehot) / n_valid on rows with a target
                probs = logits.sub_(lse).exp_()  # (n, V), in place
                probs.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=probs.dtype))
                probs.mul_((ok / n_valid)[:, None])
                g_logits.put(s, probs)
        if grad:
            ctx.save_for_backward(hc, wc, g_logits.done())
            ctx.dtypes = (h.dtype, weight.dtype)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hc, wc, g_logits = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # Scale the two (small) results rather than the (N, V) gradient by grad_out.
        grad_h = ((g_logits @ wc) * grad_out).to(h_dtype) if ctx.needs_input_grad[0] else None  # (N, C)
        grad_w = ((g_logits.T @ hc) * grad_out).to(w_dtype) if ctx.needs_input_grad[1] else None  # (V, C)
        return grad_h, grad_w, None


class _LinearForwardKL(torch.autograd.Function):
    """(1 − α)·CE + α·T²·KL(p_teacher ‖ softmax(z / T)) of z = h @ Wᵀ, the same chunked pass as above: the
    gradient with respect to z, (1 − α)(softmax(z) − onehot) + α·T·(softmax(z / T) − p_teacher), is formed while a
    chunk is in cache, so a distillation step costs what a plain one does (three head matmuls, no recompute)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor, t_logits: Tensor, t_ids: Tensor | None,
                temperature: float, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
        # h (N, C), weight (V, C), labels (N,); the teacher: t_logits (N, V), or (N, K) at the ids t_ids (N, K)
        dtype = compute_dtype(h.device.type, h.dtype)
        hc, wc = h.to(dtype), weight.to(dtype)
        n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1)
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        g_logits = _GradRows(h.shape[0], weight.shape[0], dtype, h.device) if grad else None
        ce = torch.zeros((), dtype=torch.float32, device=h.device)
        kd = torch.zeros((), dtype=torch.float32, device=h.device)
        T, a = temperature, alpha
        chunk = _chunk_rows(h, weight)
        for s in range(0, h.shape[0], chunk):
            ok = (labels[s:s + chunk] != IGNORE_INDEX).float()  # (n,)
            safe = labels[s:s + chunk].clamp(min=0)[:, None]  # (n, 1)
            z = (hc[s:s + chunk] @ wc.T).float()  # (n, V)
            lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
            ce += ((lse.squeeze(1) - z.gather(1, safe).squeeze(1)) * ok).sum()
            zt = z / T if T != 1 else z  # (n, V)
            lse_t = torch.logsumexp(zt, dim=-1, keepdim=True) if T != 1 else lse  # (n, 1)
            ids = None if t_ids is None else t_ids[s:s + chunk].long()  # (n, K)
            t_logp = torch.log_softmax(t_logits[s:s + chunk].float() / T, dim=-1)  # (n, K) or (n, V)
            s_logp = (zt if ids is None else zt.gather(1, ids)) - lse_t  # (n, K) or (n, V)
            t_p = t_logp.exp()
            kd += ((t_p * (t_logp - s_logp)).sum(-1) * ok).sum()
            if grad:
                q = (zt - lse_t).exp_()  # (n, V): softmax(z / T)
                g = (z.sub_(lse).exp_()).mul_(1 - a)  # (n, V): (1 - a) softmax(z), in place of z
                g.scatter_add_(1, safe, torch.full_like(safe, a - 1, dtype=g.dtype))
                g.add_(q, alpha=a * T)
                if ids is None:
                    g.sub_(t_p, alpha=a * T)
                else:
                    g.scatter_add_(1, ids, t_p.mul(-a * T))
                g_logits.put(s, g.mul_((ok / n_valid)[:, None]))
        if grad:
            ctx.save_for_backward(hc, wc, g_logits.done())
            ctx.dtypes = (h.dtype, weight.dtype)
        ce, kd = ce / n_valid, kd / n_valid
        ctx.mark_non_differentiable(ce, kd)
        return (1 - a) * ce + a * T * T * kd, ce, kd

    @staticmethod
    def backward(ctx, grad_out: Tensor, _ce: Tensor, _kd: Tensor):
        grad_h, grad_w, _ = _LinearCrossEntropy.backward(ctx, grad_out)
        return grad_h, grad_w, None, None, None, None, None


def linear_forward_kl(h: Tensor, weight: Tensor, labels: Tensor, t_logits: Tensor, t_ids: Tensor | None,
                      temperature: float, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """Distillation's (loss, ce, kd) for forward KL, fused with the output head; h (N, C), labels (N,), the
    teacher's logits (N, V) or its top k (N, K) at ids (N, K) (the student's full softmax at those ids: see
    train/distill.kd_terms, which this equals up to rounding)."""
    return _LinearForwardKL.apply(h, weight, labels, t_logits, t_ids, temperature, alpha)


def linear_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of `h @ weight.T` against `labels`; h (..., C), labels (...)."""
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1))


def lm_figures(loss: float, tokens: int, nbytes: int) -> dict[str, float]:
    """Perplexity and bits per byte (comparable across tokenizers) from a mean loss in nats per token."""
    return {"perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": loss / math.log(2) * tokens / max(1, nbytes)}
