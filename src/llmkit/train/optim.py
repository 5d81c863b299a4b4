"""The optimiser and the learning-rate schedule of the one loop."""

from __future__ import annotations

import math

import torch
from torch import nn

from llmkit.config import TrainConfig


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on weight matrices only: norms, biases and embeddings are left alone."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def lr_at(step: int, cfg: TrainConfig, max_steps: int | None = None) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at `max_steps` (default cfg.max_steps).

    A function of steps only, never of the clock: a resumed run and every rank of a torchrun get the same rates.
    Under a time budget `max_steps` is the planned number of steps (train/budget.py).
    """
    total = cfg.max_steps if max_steps is None else max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))

