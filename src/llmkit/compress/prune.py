"""`llmkit prune`: remove weights by magnitude or by Wanda's activation-aware score, in an N:M pattern, or remove
whole attention heads and MLP neurons (compress/structured.py) so the matrices really shrink.

Unstructured and N:M pruning zero weights but keep dense storage: the file has the same size and a dense matmul
runs at the same speed (the Wanda repository's most asked question; PyTorch's 2:4 sparse kernels need a CUDA
GPU and are not used here). What they buy is a model a sparse kernel or a compressor could exploit later; the
report states the real zero fraction. Structured pruning is the one that saves size and time on a CPU today.

Scores, per linear layer of every block (embeddings and the output head are left dense, as in the Wanda paper):
- magnitude: |W|, the smallest weights of each matrix removed (fused q/k/v and gate/up are ranked per part, as
  the separate matrices of a Hugging Face checkpoint would be);
- wanda: |W_ij| * ||X_j||_2 (Sun et al. 2023), X the layer's inputs on calibration text, ranked within each
  output row. One pass over the calibration text with the dense model (the paper recomputes the inputs block
  by block after pruning the blocks before; one pass costs 1 forward instead of n_layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmkit.compress.calibration import calibration_ids, capture_linear_inputs
from llmkit.compress.recover import check_recovery_data, recover
from llmkit.compress.structured import importance, removal_counts, shrink
from llmkit.config import ModelConfig
from llmkit.errors import CheckpointError, ConfigError
from llmkit.infer.load import Loaded, load_model
from llmkit.interop.run_folder import Converted, check_replaceable, write_run_folder
from llmkit.model import empty_model
from llmkit.model.weights import load_into, weights_for_save

METHODS = ("magnitude", "wanda", "structured")
PARTS = ("mlp", "heads", "kv_groups")


@dataclass
class PruneSpec:
    """What `llmkit prune` was asked to do (checked by `check_spec` before anything is loaded or written)."""

    method: str
    sparsity: float
    pattern: str | None = None  # "N:M": keep N of every M consecutive input weights (unstructured methods)
    parts: tuple[str, ...] = ("mlp",)  # structured: what to remove
    calib: str | None = None  # None: compress/calibration.DEFAULT_CALIB
    calib_seqs: int = 128
    calib_len: int = 256
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """`2:4` -> (2, 4): keep 2 weights in every group of 4."""
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ConfigError(f"--pattern {pattern!r}: expected N:M such as 2:4") from None
    if not 0 < n < m <= 64:
        raise ConfigError(f"--pattern {pattern!r}: expected N:M with 0 < N < M <= 64, such as 2:4")
    return n, m


def check_spec(spec: PruneSpec) -> None:
    """Every mistake in the request as one line, before a model is loaded or anything written."""
    if spec.method not in METHODS:
        raise ConfigError(f"--method {spec.method!r}: unknown (valid: {', '.join(METHODS)})")
    if not (isinstance(spec.sparsity, (int, float)) and 0 <= spec.sparsity < 1):
        raise ConfigError(f"--sparsity {spec.sparsity}: must be in [0, 1) (the fraction of weights removed)")
    if spec.pattern is not None:
        if spec.method == "structured":
            raise ConfigError("--pattern applies to --method magnitude or wanda, not structured")
        n, m = parse_pattern(spec.pattern)
        if not math.isclose(spec.sparsity, 1 - n / m):
            raise ConfigError(f"--pattern {spec.pattern} removes {m - n} of every {m} weights: --sparsity must be "
                              f"{1 - n / m:g}, got {spec.sparsity:g}")
    bad = [p for p in spec.parts if p not in PARTS]
    if bad or not spec.parts or ("heads" in spec.parts and "kv_groups" in spec.parts):
        raise ConfigError(f"--parts {','.join(spec.parts)}: give mlp, heads or kv_groups (heads and kv_groups "
                          "exclude each other), comma-separated")


def prunable_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers inside the blocks: what pruning touches."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]


def row_parts(name: str, weight: Tensor, cfg: ModelConfig) -> list[int]:
    """Row counts of the separate matrices fused into one of ours: q/k/v, gate/up; else the whole matrix."""
    hs = cfg.head_dim
    if name.endswith("attn.qkv"):
        return [cfg.n_head * hs, cfg.n_kv_head * hs, cfg.n_kv_head * hs]
    if name.endswith("mlp.fc") and cfg.arch == "llama":
        return [weight.shape[0] // 2] * 2
    return [weight.shape[0]]


def column_norms(model: nn.Module, ids: Tensor, names: list[str], quiet: bool = True) -> dict[str, Tensor]:
    """||X_j||_2 over every calibration token, per input column j of each named linear layer."""
    sums: dict[str, Tensor] = {}

    def add(name: str, x: Tensor) -> None:  # x (rows, in)
        sq = x.float().pow(2).sum(0)  # (in,)
        sums[name] = sums[name] + sq if name in sums else sq

    capture_linear_inputs(model, ids, names, add, quiet=quiet)
    return {n: s.sqrt() for n, s in sums.items()}


def prune_mask(score: Tensor, sparsity: float, per_row: bool, nm: tuple[int, int] | None) -> Tensor:
    """Bool mask (True = keep) of the same shape as `score` (out, in): the lowest scores go.

    N:M keeps the N highest of every M consecutive inputs of a row; per_row removes floor(s * in) per row;
    otherwise floor(s * numel) over the whole matrix. Counts, not thresholds: ties cannot overshoot."""
    keep = torch.ones_like(score, dtype=torch.bool)
    rows, cols = score.shape
    if nm is not None:
        n, m = nm
        groups = score.reshape(rows, cols // m, m)  # (out, in/m, m)
        drop = groups.topk(m - n, dim=-1, largest=False).indices
        return keep.reshape(rows, cols // m, m).scatter_(-1, drop, False).reshape(rows, cols)
    if per_row:
        k = int(cols * sparsity)
        if k:
            keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
        return keep
    k = int(score.numel() * sparsity)
    if k:
        keep.view(-1)[score.flatten().topk(k, largest=False).indices] = False
    return keep


@torch.no_grad()
def prune_unstructured(model: nn.Module, cfg: ModelConfig, spec: PruneSpec,
                       norms: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """Zero weights in place; returns each pruned layer's keep-mask (recovery training holds the zeros)."""
    nm = parse_pattern(spec.pattern) if spec.pattern else None
    masks: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    for name in prunable_linears(model):
        w = modules[name].weight  # (out, in)
        if nm is not None and w.shape[1] % nm[1]:
            raise ConfigError(f"--pattern {spec.pattern}: {name} has {w.shape[1]} inputs, not a multiple of {nm[1]}")
        score = w.abs().float()  # (out, in)
        if spec.method == "wanda":
            assert norms is not None
            score = score * norms[name].to(score.device)[None, :]  # (out, in)
            keep = prune_mask(score, spec.sparsity, per_row=True, nm=nm)
        else:
            keep = torch.cat([prune_mask(part, spec.sparsity, per_row=False, nm=nm)
                              for part in score.split(row_parts(name, w, cfg), dim=0)])
        w.mul_(keep.to(w.dtype))
        masks[name] = keep
    return masks


def zero_fractions(model: nn.Module) -> dict[str, float]:
    """Exact zeros per pruned layer, and over the pruned layers and the whole model (embeddings included)."""
    modules = dict(model.named_modules())
    per = {n: float((modules[n].weight == 0).float().mean()) for n in prunable_linears(model)}
    zeros = sum(int((modules[n].weight == 0).sum()) for n in per)
    total = sum(modules[n].weight.numel() for n in per)
    everything = weights_for_save(model)
    all_zero = sum(int((t == 0).sum()) for t in everything.values())
    all_n = sum(t.numel() for t in everything.values())
    return {"layers": zeros / max(1, total), "model": all_zero / max(1, all_n), **per}


def check_prunable(loaded: Loaded, src: str | Path) -> None:
    """Pruning works on full-precision decoder weights."""
    if any(not t.is_floating_point() for t in loaded.weights.values()):
        raise CheckpointError(f"{src}: holds integer (quantised) weights; prune the full-precision model, then "
                              "quantise the result")


def calibration(loaded: Loaded, spec: PruneSpec) -> Tensor:
    """(N, T) calibration windows, T at most the model's context."""
    seq_len = min(spec.calib_len, loaded.cfg.block_size)
    return calibration_ids(loaded.tokenizer, spec.calib, spec.calib_seqs, seq_len, seed=spec.seed)


def prune_model(src: str, spec: PruneSpec, out: str | Path, recover_steps: int = 0, data: str | None = None,
                recover_lora: bool = False, recover_lr: float | None = None, recover_batch_size: int = 8,
                recover_seq_len: int = 256, device: str = "auto", quiet: bool = False) -> dict[str, Any]:
    """Load `src`, prune it as `spec` says, optionally recover, write a run folder to `out`; return the report.
    Every check runs before the slow work, and `out` is written atomically at the end, so a failure leaves it
    untouched."""
    check_spec(spec)
    if recover_steps and data is None:
        raise ConfigError("--recover-steps needs --data, a folder written by `llmkit prepare` with the model's "
                          "tokenizer")
    check_replaceable(Path(out))
    loaded = load_model(src, device=device, dtype="float32", need="decoder")
    check_prunable(loaded, src)
    data_path = check_recovery_data(data, loaded.tokenizer) if recover_steps else None
    model, cfg = loaded.model, loaded.cfg
    counts = removal_counts(cfg, spec.sparsity, spec.parts) if spec.method == "structured" else None
    base = weights_for_save(model)
    report: dict[str, Any] = {"model": str(src), "out": str(out), "method": spec.method, "sparsity": spec.sparsity,
                              "pattern": spec.pattern, "params_before": sum(t.numel() for t in base.values())}
    ids = calibration(loaded, spec) if spec.method != "magnitude" else None
    if ids is not None:
        report["calibration"] = {"data": spec.calib or "shakespeare (built-in)", "windows": int(ids.shape[0]),
                                 "tokens_per_window": int(ids.shape[1])}
    masks: dict[str, Tensor] | None = None
    if counts is not None:
        assert ids is not None
        weights, cfg = shrink(base, cfg, counts, importance(model, ids, counts, quiet=quiet))
        model = empty_model(cfg)
        load_into(model, weights, f"{src} (pruned)", assign=True)
        model.to(next(loaded.model.parameters()).device).eval()
        report.update(parts=list(spec.parts), neurons_removed_per_layer=counts.neurons,
                      query_heads_removed_per_group=counts.heads_per_group,
                      kv_groups_removed_per_layer=counts.groups, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head,
                      head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size)
    else:
        norms = column_norms(model, ids, prunable_linears(model), quiet=quiet) if ids is not None else None
        masks = prune_unstructured(model, cfg, spec, norms)
    if recover_steps:
        assert data_path is not None
        model, report["recovery"] = recover(model, data_path, recover_steps, lora=recover_lora, lr=recover_lr,
                                            batch_size=recover_batch_size, seq_len=recover_seq_len, masks=masks,
                                            device=device, seed=spec.seed, quiet=quiet)
    zeros = zero_fractions(model)
    weights = weights_for_save(model)
    report.update(params_after=sum(t.numel() for t in weights.values()), zero_fraction_layers=zeros["layers"],
                  zero_fraction_model=zeros["model"],
                  zero_fraction_per_layer={k: v for k, v in zeros.items() if k not in ("layers", "model")})
    write_run_folder(Converted(cfg, weights, loaded.tokenizer,
                               {"format": "llmkit", "pruned_from": str(src), "prune": report}), out)
    report["bytes"] = (Path(out) / "model.safetensors").stat().st_size
    return report
