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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llmkit.errors import CheckpointError

KEEP_CHECKPOINTS = 2


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; the final one gets normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def weights_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses shared storage) and without non-persistent buffers."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        ptr = t.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[name] = t.detach().contiguous().cpu()
    return out


def save_weights(model: nn.Module | dict[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None) -> None:
    tensors = weights_for_save(model) if isinstance(model, nn.Module) else model
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata or {"format": "pt"}))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights not found: {p}")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p}: not a readable safetensors file ({str(e).splitlines()[0][:160]}); "
                              "it may be truncated") from None


def load_into(model: nn.Module, tensors: dict[str, torch.Tensor], source: str | Path, assign: bool = False,
              optional: tuple[str, ...] = ()) -> None:
    """Load weights strictly by name and shape, with one-line errors that name the file and the tensor.

    Names starting with an `optional` prefix may be absent (an encoder checkpoint without pre-training heads).

    `assign=True` adopts the given tensors as the parameters instead of copying into them: no second copy of the
    weights in memory (loading a pretrained model into an uninitialised one); tied parameters are re-tied."""
    own = model.state_dict()
    kept = weights_for_save(model).keys()
    tied = set(own) - set(kept)  # shared with a tensor saved under another name
    for name, t in tensors.items():
        if name not in own:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} (the checkpoint is for another model shape)")
        if tuple(t.shape) != tuple(own[name].shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(t.shape)} but the config needs "
                                  f"{tuple(own[name].shape)}")
    missing = [n for n in own if n not in tensors and n not in tied and not (optional and n.startswith(optional))]
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if not assign:
        model.load_state_dict(tensors, strict=False)
        return
    shared: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    model.load_state_dict(tensors, strict=False, assign=True)
    for names in shared.values():  # assign replaced one of the tied names only: point the others at it
        loaded = next((n for n in names if n in tensors), names[0])
        for name in names:
            if name != loaded:
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, model.get_parameter(loaded))


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
