"""Model weights on disk: safetensors only (no pickle, so a weight file cannot run code), loaded strictly.

`load_into` checks every name and shape and says which file and tensor do not fit, in one line.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llmkit.errors import CheckpointError
from llmkit.files import atomic_write


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
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {"format": "pt"}))


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

