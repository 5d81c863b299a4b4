"""The quantisation grids: int8 symmetric per output row, int4 asymmetric per group of input weights, and
round-to-nearest onto them. GPTQ (gptq.py) uses the same grids and only chooses the codes differently.

Scales and zeros are rounded to bfloat16 before any code is chosen: the kernels compute with bfloat16 scales, so
the stored codes are exactly right for the scales they will meet.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmkit.model.quant import QuantLinear, pack_int4


def round_bf16(t: Tensor) -> Tensor:
    """Scales and zeros as the kernels will see them (bfloat16), kept in float32 for the arithmetic."""
    return t.to(torch.bfloat16).float()


def int8_scales(w: Tensor) -> Tensor:
    """(N,) symmetric per-row scales: the row's largest magnitude maps to 127."""
    s = round_bf16(w.abs().amax(dim=1).float() / 127)
    return torch.where(s > 0, s, torch.ones_like(s))


def int8_codes(w: Tensor, s: Tensor) -> Tensor:
    return torch.clamp(torch.round(w / (s[:, None] if w.dim() == 2 else s)), -128, 127)  # (N, K) or (N,)


def int4_params(w: Tensor) -> tuple[Tensor, Tensor]:
    """Scale and zero (N,) of one group w (N, g): the group's [min, max] spread over the 16 codes, asymmetric
    (a zero point per group), as w = (q - 8) * s + z."""
    lo, hi = w.amin(dim=1).float(), w.amax(dim=1).float()
    s = round_bf16((hi - lo) / 15)
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = round_bf16(lo + 8 * s)
    return s, z


def int4_codes(w: Tensor, s: Tensor, z: Tensor) -> Tensor:
    """Codes 0..15 of w (N,) or (N, g) for scale/zero (N,)."""
    if w.dim() == 2:
        s, z = s[:, None], z[:, None]
    return torch.clamp(torch.round((w - z) / s) + 8, 0, 15)


def rtn(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round to nearest: (codes (N, K), scales, zeros or None)."""
    w = w.float()
    if bits == 8:
        s = int8_scales(w)
        return int8_codes(w, s), s, None
    N, K = w.shape
    groups = w.reshape(N * K // group_size, group_size)  # (N*G, g)
    s, z = int4_params(groups)
    q = int4_codes(groups, s, z).reshape(N, K)
    return q, s.reshape(N, -1), z.reshape(N, -1)


def make_layer(lin: nn.Linear, bits: int, group_size: int, q: Tensor, s: Tensor, z: Tensor | None) -> QuantLinear:
    """A QuantLinear holding codes q (N, K) with scales/zeros, and the float layer's bias."""
    new = QuantLinear(lin.in_features, lin.out_features, bits, group_size, bias=lin.bias is not None)
    with torch.no_grad():
        new.qweight = q.to(torch.int8) if bits == 8 else pack_int4(q)
        new.scales = s.float()
        if z is not None:
            new.zeros = z.float()
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.detach().float().clone(), requires_grad=False)
    return new


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, new)
