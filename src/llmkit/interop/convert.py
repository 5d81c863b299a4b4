"""`llmkit convert`: Hugging Face folders and GGUF files in, llmkit run folders or Hugging Face folders out.

    HF folder  --read_hf_folder-->   Converted  --write_run_folder-->  llmkit run folder
    GGUF file  --read_gguf-------->  Converted  --write_hf_folder--->  HF folder transformers loads
    run folder --read_run_folder-->  Converted
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmkit.errors import CheckpointError
from llmkit.interop.hf_folder import write_hf_folder
from llmkit.interop.run_folder import write_run_folder
from llmkit.interop.sources import read_any
from llmkit.runtime import resolve_dtype


def convert(src: str | Path, dst: str | Path, to: str, dtype: str | None = None) -> Path:
    """The `llmkit convert` verb: anything readable -> an llmkit run folder (`to="llmkit"`) or HF folder."""
    if to not in ("llmkit", "hf"):
        raise CheckpointError(f"--to {to!r}: valid targets are llmkit and hf")
    conv = read_any(src)
    if dtype:
        conv.weights = {k: v.to(resolve_dtype(dtype, torch.device("cpu"))) for k, v in conv.weights.items()}
    return write_run_folder(conv, dst) if to == "llmkit" else write_hf_folder(conv, dst)
