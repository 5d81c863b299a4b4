"""Training objectives: what a batch means and which loss it gives. Each plugs into the one loop in train.py.

An objective is a callable `(model, batch) -> (loss, metrics)`; `metrics` holds extra scalar tensors to
average and log beside the loss (e.g. masked-token accuracy). New objectives register in `OBJECTIVES`.
"""

from __future__ import annotations

from typing import Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.errors import ConfigError

IGNORE_INDEX = -100


class Objective(Protocol):
    name: str

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]: ...


class CausalLM:
    """Next-token prediction: batch has input_ids (B, T) and labels (B, T) shifted by one; -100 is ignored."""

    name = "causal_lm"

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch["input_ids"]).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
        return loss, {}


OBJECTIVES: dict[str, type] = {"causal_lm": CausalLM}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ConfigError(f"train.objective: unknown objective {name!r} (valid: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]()
