"""Attention as numbers a person can compare: per-head summaries, attention rollout, and bertviz's JSON shape.

Summaries average over query positions, so heads of one model compare at a glance: `entropy` (nats; low = a head
that looks at one token, high = one that spreads out), `mean_distance` (how far back/forward, in tokens, the
attention mass sits: local vs long-range heads), `first_token` (mass on position 0, the "attention sink" many
heads park their weight on when they have nothing to do).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def head_summaries(attentions: list[Tensor]) -> list[dict[str, float | int]]:
    """One {"layer", "head", "entropy", "mean_distance", "first_token"} per head, layer by layer.

    Computed one layer at a time in float64, so a 1,000-token input costs one layer's (nh, T, T) extra, not all."""
    rows: list[dict[str, float | int]] = []
    for li, a in enumerate(attentions):
        a = a.double()  # (nh, T, T)
        T = a.shape[-1]
        pos = torch.arange(T, dtype=torch.float64, device=a.device)
        dist = (pos[:, None] - pos[None, :]).abs()  # (T, T) |query - key|
        entropy = -torch.special.xlogy(a, a).sum(-1).mean(-1)  # (nh,)  0 log 0 = 0
        distance = (a * dist).sum(-1).mean(-1)  # (nh,)
        first = a[..., 0].mean(-1)  # (nh,)
        for h in range(a.shape[0]):
            rows.append({"layer": li, "head": h, "entropy": float(entropy[h]), "mean_distance": float(distance[h]),
                         "first_token": float(first[h])})
    return rows


def rollout(attentions: list[Tensor]) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020), (T, T) float64: row i = how much token i's final state draws on
    each input token through every layer.

    The residual connection carries a token's own state past each attention layer, so each layer is taken as
    A_hat = 0.5 * mean over heads(A) + 0.5 * I, rows renormalised to sum to 1, and the layers compose by matrix
    product, the last layer on the left: R = A_hat_L @ ... @ A_hat_1."""
    T = attentions[0].shape[-1]
    eye = torch.eye(T, dtype=torch.float64, device=attentions[0].device)  # (T, T)
    out = eye
    for a in attentions:
        a_hat = 0.5 * a.double().mean(0) + 0.5 * eye  # (T, T)
        a_hat = a_hat / a_hat.sum(-1, keepdim=True)
        out = a_hat @ out  # (T, T)
    return out


def bertviz_json(attention_layers: list[list[list[list[float]]]], tokens: list[str]) -> dict[str, Any]:
    """The `params` object bertviz's `head_view` JavaScript reads (what its Python `head_view` builds from
    `output_attentions`): attention as layers x heads x T x T, the same tokens on both sides. Save it and load it
    into bertviz's view, or any tool that reads that shape."""
    return {"attention": [{"name": None, "attn": attention_layers, "left_text": tokens, "right_text": tokens}],
            "default_filter": "0", "root_div_id": "bertviz", "layer": None, "heads": None,
            "include_layers": list(range(len(attention_layers)))}
