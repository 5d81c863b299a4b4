"""One checkpoint format, written so that nothing already saved is ever lost.

A run folder holds:
  config.yaml                 the resolved RunConfig
  tokenizer/                  the tokenizer the model was trained with
  model.safetensors           best weights so far (what `generate`/`eval` load)
  checkpoints/step_000200/    model.safetensors + state.pt (optimizer, data position, RNG, counters)
  checkpoints/latest          name of the newest complete checkpoint

Every file is written to a temporary name and renamed into place, and a checkpoint folder is only named in
`latest` once it is complete, so a crash mid-write leaves the previous checkpoint intact. `state.pt` holds
only tensors and plain Python values and is read with `torch.load(..., weights_only=True)`: no pickle code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmkit.errors import CheckpointError
from llmkit.files import atomic_write_text
from llmkit.model.weights import load_weights, save_weights

KEEP_CHECKPOINTS = 2


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write checkpoints/step_N/ completely, then point `latest` at it, then prune old ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    save_weights(model, tmp / "model.safetensors")
    torch.save(state, tmp / "state.pt")
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", name + "\n")
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights = load_weights(path / "model.safetensors")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path / 'state.pt'}: unreadable training state ({str(e).splitlines()[0][:160]})") \
            from None
    return weights, state
