"""Structured pruning: remove whole MLP neurons and attention heads, so every matrix really gets smaller (a smaller
file, fewer FLOPs per token, a smaller KV cache when whole KV groups go).

The same number of neurons / heads leaves every layer, so the result is an ordinary model of a smaller uniform
config (`n_head`, `n_kv_head`, `head_dim`, `intermediate_size`) that every verb loads and `convert --to hf`
exports. Importance is what a unit adds to the residual stream on calibration text, the expected squared norm
of its output (as in FLAP / Wanda-sp, with the activations of the dense model):
- MLP neuron j: ||W_down[:, j]||^2 * E[h_j^2], h the input of the down projection;
- attention head h: E||W_o[:, h] y_h||^2 = trace(W_h^T W_h E[y_h y_h^T]), y_h the head's output before o_proj.
The kept units then take over what the removed ones did, as far as a linear map can: the matrix that reads them
(the MLP's down projection, attention's output projection) is refitted by least squares to reproduce the dense
layer's output on the calibration activations, W_K + W_R G_RK (G_KK + lambda I)^-1 with G = X^T X (the
compensation step of OBS-style structured pruning, e.g. SlimGPT / ZipLM; FLAP's bias compensation is its
rank-one cousin). It costs one Gram matrix per layer and starts any recovery fine-tune from a far better point.
Grouped-query attention: `heads` removes the same number of query heads from every KV group (the KV cache keeps
its size); `kv_groups` removes whole groups (a KV head and its query heads; the cache shrinks too). With one
query head per KV head the two are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from llmkit.compress.calibration import capture_linear_inputs
from llmkit.config import ModelConfig
from llmkit.errors import ConfigError


def removed(sparsity: float, n: int) -> int:
    """How many of n units a fraction removes (rounded half up)."""
    return math.floor(sparsity * n + 0.5)


@dataclass
class Counts:
    """Units removed per layer, the same in every layer."""

    neurons: int = 0  # of intermediate_size
    heads_per_group: int = 0  # query heads removed from each KV group
    groups: int = 0  # whole KV groups removed


def removal_counts(cfg: ModelConfig, sparsity: float, parts: tuple[str, ...]) -> Counts:
    """The per-layer counts, or a one-line error when they would remove everything or the result could not be
    described by a config that exports (checked before any calibration runs)."""
    c = Counts()
    if "mlp" in parts:
        c.neurons = removed(sparsity, cfg.intermediate_size)
        if c.neurons >= cfg.intermediate_size:
            raise ConfigError(f"--sparsity {sparsity:g} removes all {cfg.intermediate_size} MLP neurons of every "
                              "layer; use a smaller fraction")
    if "heads" in parts or "kv_groups" in parts:
        if cfg.arch != "llama":
            raise ConfigError(f"removing attention heads needs model.arch llama (a {cfg.arch} config cannot "
                              "describe heads narrower than n_embd / n_head, so the result would not export); "
                              "use --parts mlp")
        group = cfg.n_head // cfg.n_kv_head
        if "heads" in parts and group > 1:
            c.heads_per_group = removed(sparsity, group)
            if c.heads_per_group >= group:
                raise ConfigError(f"--sparsity {sparsity:g} removes all {group} query heads of every KV group; "
                                  "use a smaller fraction, or --parts kv_groups")
        else:
            c.groups = removed(sparsity, cfg.n_kv_head)
            if c.groups >= cfg.n_kv_head:
                raise ConfigError(f"--sparsity {sparsity:g} removes all {cfg.n_kv_head} KV heads of every layer; "
                                  "use a smaller fraction")
    return c


@torch.no_grad()
def importance(model: nn.Module, ids: Tensor, counts: Counts, quiet: bool = True) -> dict[str, list[Tensor]]:
    """Per layer: `neurons` (I,) and `heads` (n_head,) importance on the calibration windows `ids` (N, T)."""
    cfg: ModelConfig = model.cfg  # type: ignore[assignment]
    nh, hs = cfg.n_head, cfg.head_dim
    names = []
    if counts.neurons:
        names += [f"blocks.{i}.mlp.proj" for i in range(cfg.n_layer)]
    if counts.heads_per_group or counts.groups:
        names += [f"blocks.{i}.attn.proj" for i in range(cfg.n_layer)]
    grams: dict[str, Tensor] = {}

    def add(name: str, x: Tensor) -> None:  # x (rows, in)
        x = x.float()
        g = x.T @ x  # (in, in): the input's Gram matrix, for importance and for compensation
        grams[name] = grams[name] + g if name in grams else g

    capture_linear_inputs(model, ids, names, add, quiet=quiet)
    modules = dict(model.named_modules())
    out: dict[str, list[Tensor]] = {"neurons": [], "heads": [], "mlp_gram": [], "attn_gram": []}
    for i in range(cfg.n_layer):
        if counts.neurons:
            g = grams[f"blocks.{i}.mlp.proj"]  # (I, I)
            w = modules[f"blocks.{i}.mlp.proj"].weight.float()  # (C, I)
            out["neurons"].append(w.pow(2).sum(0) * g.diagonal())  # (I,)
            out["mlp_gram"].append(g)
        if counts.heads_per_group or counts.groups:
            g = grams[f"blocks.{i}.attn.proj"]  # (nh * hs, nh * hs)
            per_head = g.view(nh, hs, nh, hs).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (nh, hs, hs)
            w = modules[f"blocks.{i}.attn.proj"].weight.float().view(-1, nh, hs)  # (C, nh, hs)
            wtw = torch.einsum("chd,che->hde", w, w)  # (nh, hs, hs)
            out["heads"].append((wtw * per_head).sum((1, 2)))  # (nh,)
            out["attn_gram"].append(g)
    return out


def compensate(w: Tensor, gram: Tensor, keep: Tensor, damp: float = 0.01) -> Tensor:
    """The columns `keep` of `w` (out, in), corrected so that x[:, keep] @ result.T best reproduces x @ w.T on the
    calibration inputs whose Gram matrix is `gram` (in, in): the kept columns absorb the part of the removed
    inputs they can predict, W_K + W_R G_RK (G_KK + lambda I)^-1. A removed input that was always zero or whose
    weights were zero changes nothing. `damp` (a fraction of G_KK's mean diagonal, as GPTQ's) keeps the solve
    stable when kept inputs are nearly collinear or never active."""
    drop = torch.ones(w.shape[1], dtype=torch.bool)
    drop[keep] = False
    g = gram.double()
    gkk = g[keep][:, keep]  # (K, K)
    gkk = gkk + damp * gkk.diagonal().mean().clamp_min(1e-12) * torch.eye(len(keep), dtype=g.dtype)
    rhs = g[keep][:, drop] @ w[:, drop].double().T  # (K, out): what the removed inputs wrote, seen from the kept
    delta = torch.linalg.solve(gkk, rhs).T  # (out, K)
    return (w[:, keep].double() + delta).to(w.dtype).contiguous()


def _top(scores: Tensor, keep: int) -> Tensor:
    """Indices of the `keep` highest scores, in their original order."""
    return scores.topk(keep).indices.sort().values


def kept_heads(scores: Tensor, cfg: ModelConfig, counts: Counts) -> tuple[Tensor, Tensor]:
    """(kept query heads, kept KV heads) of one layer, both sorted, so query head j of the result still belongs
    to KV group j // (its new group size)."""
    nkv, group = cfg.n_kv_head, cfg.n_head // cfg.n_kv_head
    per_group = scores.view(nkv, group)  # (nkv, g)
    if counts.groups:
        kv = _top(per_group.sum(1), nkv - counts.groups)
        q = (kv[:, None] * group + torch.arange(group)[None, :]).flatten()
        return q, kv
    keep = group - counts.heads_per_group
    q = torch.cat([g * group + _top(per_group[g], keep) for g in range(nkv)])
    return q, torch.arange(nkv)


def _head_rows(heads: Tensor, hs: int, offset: int = 0) -> Tensor:
    return (offset + heads[:, None] * hs + torch.arange(hs)[None, :]).flatten()  # (len(heads) * hs,)


def shrink(weights: dict[str, Tensor], cfg: ModelConfig, counts: Counts,
           scores: dict[str, list[Tensor]]) -> tuple[dict[str, Tensor], ModelConfig]:
    """The smaller state dict and its config: the kept rows / columns of each layer's matrices."""
    out = dict(weights)
    nh, nkv, hs, inter = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.intermediate_size
    new_nh, new_nkv, new_inter = nh, nkv, inter
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        if counts.neurons:
            keep = _top(scores["neurons"][i], inter - counts.neurons)
            rows = torch.cat([keep, inter + keep]) if cfg.arch == "llama" else keep  # gate and up rows
            for name in (p + "mlp.fc.weight", p + "mlp.fc.bias"):
                if name in out:
                    out[name] = out[name][rows].contiguous()
            out[p + "mlp.proj.weight"] = compensate(out[p + "mlp.proj.weight"], scores["mlp_gram"][i], keep)
            new_inter = len(keep)
        if counts.heads_per_group or counts.groups:
            q, kv = kept_heads(scores["heads"][i], cfg, counts)
            rows = torch.cat([_head_rows(q, hs), _head_rows(kv, hs, nh * hs), _head_rows(kv, hs, (nh + nkv) * hs)])
            for name in (p + "attn.qkv.weight", p + "attn.qkv.bias"):
                if name in out:
                    out[name] = out[name][rows].contiguous()
            out[p + "attn.proj.weight"] = compensate(out[p + "attn.proj.weight"], scores["attn_gram"][i],
                                                     _head_rows(q, hs))
            new_nh, new_nkv = len(q), len(kv)
    new_cfg = replace(cfg, n_head=new_nh, n_kv_head=new_nkv, head_dim=hs, intermediate_size=new_inter)
    return out, new_cfg
