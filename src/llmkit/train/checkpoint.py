"""One checkpoint format, written so that nothing already saved is ever lost, even by `kill -9` at any moment.

A run folder holds:
  config.yaml                 the resolved RunConfig
  tokenizer/                  the tokenizer the model was trained with
  model.safetensors           best weights so far (what `generate`/`eval` load)
  metrics.jsonl, loss.png     one JSON line per logged step and evaluation; the curve drawn from it
  checkpoints/step_000200/    model.safetensors + state.pt (optimizer, data position, RNG, counters)
  checkpoints/latest          name of the newest complete checkpoint

A checkpoint folder is written under a temporary name, every file and the folder fsynced, renamed into place, and
only then named in `latest` (itself written atomically), so a crash mid-write leaves the previous checkpoint
intact and `latest` never names a missing folder. Old checkpoints are pruned by their step *number* (names stop
sorting at step 1,000,000) and only those older than the one just written. `state.pt` holds only tensors and
plain Python values and is read with `torch.load(..., weights_only=True)`: no pickle code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmkit.errors import CheckpointError, ConfigError
from llmkit.files import atomic_dir, atomic_write_text, remove_leftovers
from llmkit.model.weights import load_weights, save_weights

KEEP_CHECKPOINTS = 2
# What a training run writes; `--overwrite` removes exactly these (never a user's other files).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "model.safetensors", "loss.png", "tensorboard", "eval.json",
               "confusion_matrix.png", "adapter", "autosize.json")
USED_MARKERS = ("checkpoints", "metrics.jsonl", "model.safetensors")  # any of them: an earlier run was here
# Fault-injection hook for bench/faults.py: seconds to sleep between the files of a checkpoint, so that a random
# SIGKILL often lands mid-write. Unset (the default) it costs nothing.
SLOW_WRITE_ENV = "LLMKIT_FAULT_SLOW_WRITE_S"
_STEP_NAME = re.compile(r"step_(\d+)")


def remove_outputs(run_dir: Path, names: tuple[str, ...]) -> None:
    """--overwrite: remove what a run of this kind writes (files, folders, links), nothing else in the folder."""
    for name in names:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def start_run_folder(run_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a fresh run into an earlier one; clear what a killed run left half-written.

    Under torchrun every rank checks (they all see the same folder) but only rank 0 deletes."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: pass one (continue the run, or start "
                          "it again)")
    used = [n for n in USED_MARKERS if (run_dir / n).exists()]
    if used and not resume and not overwrite:
        raise ConfigError(f"{run_dir} holds an earlier run ({', '.join(used)}): pass --resume to continue it or "
                          "--overwrite to start again")
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if overwrite:
        remove_outputs(run_dir, RUN_OUTPUTS)
    remove_leftovers(run_dir)
    remove_leftovers(run_dir / "checkpoints", also=".step_*")  # `.step_*`: temp folders of older llmkit versions


def checkpoint_step(path: Path) -> int | None:
    """The step number in a checkpoint folder's name, or None for anything else (`latest`, temp folders)."""
    m = _STEP_NAME.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) for every finished checkpoint folder under `root`, oldest first by number."""
    found = [(checkpoint_step(p), p) for p in Path(root).glob("step_*") if p.is_dir()]
    return sorted((s, p) for s, p in found if s is not None)


def _fault_pause() -> None:
    seconds = float(os.environ.get(SLOW_WRITE_ENV) or 0)
    if seconds > 0:
        time.sleep(seconds)


def save_checkpoint(run_dir: Path, step: int, model: nn.Module | dict[str, torch.Tensor],
                    state: dict[str, Any]) -> Path:
    """Write checkpoints/step_N/ completely, then point `latest` at it, then prune older ones.

    `model` may be the weights already gathered (train/distributed.py: a sharded model's full state dict)."""
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:06d}"
    with atomic_dir(root / name) as tmp:  # fsyncs the files and the folder, renames, fsyncs checkpoints/
        save_weights(model, tmp / "model.safetensors")
        _fault_pause()
        torch.save(state, tmp / "state.pt")
        _fault_pause()
    _fault_pause()
    atomic_write_text(root / "latest", name + "\n")
    older = [p for s, p in step_folders(root) if s < step]
    for old in older[: max(0, len(older) - (KEEP_CHECKPOINTS - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder `latest` names; if `latest` is missing, unreadable or names no folder, the newest complete
    step_N folder by number (complete: both files load). A folder that `latest` names but that does not load is
    reported by `load_checkpoint`, not skipped: silently resuming from further back would lose work."""
    root = Path(run_dir) / "checkpoints"
    try:
        name = (root / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if _STEP_NAME.fullmatch(name) and (root / name).is_dir():
        return root / name
    for _, path in reversed(step_folders(root)):
        try:
            load_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights = load_weights(path / "model.safetensors")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path / 'state.pt'}: unreadable training state ({str(e).splitlines()[0][:160]})") \
            from None
    return weights, state


def truncate_metrics(path: Path, step: int) -> None:
    """A resumed run rewrites what came after its checkpoint: drop those lines so no step appears twice.

    A kill in the middle of a write leaves the last line cut short; it is dropped too (its step is run again).
    A bad line anywhere else is not a kill's doing and is named, not guessed at."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            if i == len(lines) - 1:
                continue
            raise CheckpointError(f"{path}:{i + 1}: not a metrics record (expected a JSON object with a step); "
                                  "fix or delete that line to resume")
        if rec["step"] <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))
