"""`llmkit convert`: Hugging Face folders and GGUF files in, llmkit run folders or Hugging Face folders out.

    HF folder  --read_hf_folder-->   Converted  --write_run_folder-->  llmkit run folder
    GGUF file  --read_gguf-------->  Converted  --write_hf_folder--->  HF folder transformers loads
    run folder --read_run_folder-->  Converted  --export_gguf------->  GGUF file llama.cpp runs (gguf_write.py)
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmkit.errors import CheckpointError
from llmkit.interop.hf_folder import write_hf_folder
from llmkit.interop.run_folder import check_replaceable, write_run_folder
from llmkit.interop.sources import read_any
from llmkit.model import check_weights
from llmkit.model.quant import is_quantized
from llmkit.runtime import resolve_dtype


def convert(src: str | Path, dst: str | Path, to: str, dtype: str | None = None, quant: str | None = None) -> Path:
    """The `llmkit convert` verb: anything readable -> an llmkit run folder (`to="llmkit"`), an HF folder, or a
    GGUF file (`to="gguf"`, `quant` f16 | q8_0 | q4_0).

    A folder `dst` must be new, empty or a model folder llmkit wrote: it is replaced as a whole
    (`check_replaceable`); a GGUF `dst` is one file, replaced atomically."""
    if to not in ("llmkit", "hf", "gguf"):
        raise CheckpointError(f"--to {to!r}: valid targets are llmkit, hf and gguf")
    if to == "gguf":
        if dtype:
            raise CheckpointError("--dtype applies to --to llmkit | hf; a GGUF file's precision is --quant")
        from llmkit.interop.gguf_write import write_gguf

        return Path(write_gguf(src, dst, quant=quant or "f16")["path"])
    if quant:
        raise CheckpointError(f"--quant {quant} applies to --to gguf only (use `llmkit quantize` for run folders)")
    check_replaceable(Path(dst))  # before the (slow) read: refuse at once to overwrite what llmkit did not write
    conv = read_any(src)
    if conv.is_classifier:  # its head has no HF counterpart here, and a run folder of it would lose the labels
        raise CheckpointError(f"{src}: {conv.describe()}; `llmkit convert` converts language models, not "
                              "fine-tuned classifiers (classify with the run folder as it is)")
    if conv.cfg.arch == "lstm" and to == "hf":  # the recurrent baseline (model/lstm.py) has no HF flavour
        raise CheckpointError(f"{src}: an LSTM language model has no transformers equivalent; --to hf exports "
                              "Transformers (gpt2, llama, bert, mbart)")
    if is_quantized(conv.weights):  # int8/int4 layers have no HF or float-run-folder form without losing that
        raise CheckpointError(f"{src}: a model quantised by `llmkit quantize`; --to {to} needs float weights: "
                              "convert the model it was quantised from (or export it with --to gguf)")
    if conv.source.get("format") == "llmkit":  # HF and GGUF readers check names and shapes as they map them
        check_weights(conv.cfg, conv.weights, Path(conv.source["path"]) / "model.safetensors")
    if dtype:
        conv.weights = {k: v.to(resolve_dtype(dtype, torch.device("cpu"))) for k, v in conv.weights.items()}
    return write_run_folder(conv, dst) if to == "llmkit" else write_hf_folder(conv, dst)
