"""One answer to "where is this model?": a run folder, an HF folder, a `.gguf` file or a built-in name.

`read_any` turns any of them into a `Converted` (config, llmkit-named weights, tokenizer); every verb that takes
`--model` goes through it (via `infer.load`), and so does `llmkit convert`.
"""

from __future__ import annotations

from pathlib import Path

from llmkit.errors import CheckpointError
from llmkit.interop.hf_folder import read_hf_folder
from llmkit.interop.registry import locate
from llmkit.interop.run_folder import Converted, read_run_folder


def read_any(src: str | Path, quiet: bool = False) -> Converted:
    """Run folder, HF folder, `.gguf` file or built-in model name -> Converted. GGUF files are dequantised once
    into a cached run folder (`interop/registry.py`), so later reads are a plain safetensors load."""
    folder = locate(src, quiet=quiet)
    if (folder / "config.yaml").is_file():
        return read_run_folder(folder)
    if (folder / "config.json").is_file():
        return read_hf_folder(folder)
    raise CheckpointError(f"{folder}: not a model folder (no config.yaml of an llmkit run, no config.json of a "
                          "Hugging Face model)")
