"""GGUF (llama.cpp) import: tensors dequantised with the `gguf` package, tokenizer rebuilt from metadata.

A GGUF file holds quantised tensors under llama.cpp names and the tokenizer as metadata (`tokenizer.ggml.*`).
The path is GGUF -> HF names and config keys (tables in `hf.py`) -> llmkit, the same road an HF folder takes.
Two llama.cpp conventions are undone on the way:
  * Q and K rows are permuted so rotary pairs are interleaved (x0, x_{d/2}, x1, ...); HF and llmkit rotate
    halves, so `unpermute_rotary` swaps them back (transformers' `reverse_permute_weights` does the same).
  * tokens of a byte-level BPE vocabulary are stored in GPT-2's byte->unicode spelling, merges as "a b" strings.
Reading and dequantising the 135 M SmolLM2 file takes seconds; `registry` caches the result as a run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import CheckpointError
from llmkit.interop.hf import GGUF_CONFIG, gguf_to_hf_name, hf_stores_transposed
from llmkit.interop.hf_folder import hf_weights_to_llmkit
from llmkit.interop.run_folder import Converted

SUPPORTED_ARCHS = ("llama", "gpt2")
# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (llama.cpp's names); others get GPT-2's own pattern.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                        "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT}
# Vocabularies trained with every digit on its own (SmolLM's tokenizer.json: Digits + ByteLevel).
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def unpermute_rotary(w: Tensor, n_head: int) -> Tensor:
    """(n_head * hs, C) llama.cpp Q/K rows -> HF order: per head, (hs/2, 2) interleaved pairs -> (2, hs/2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # numpy/struct errors when the data ends early; keep the first line as a detail
        msg = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({path.stat().st_size:,} bytes; "
                              f"reading it failed with: {msg})") from None


def _meta(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_hf_config(reader, path: Path) -> dict[str, Any]:
    """GGUF metadata -> an HF `config.json` mapping (llama family, or GPT-2)."""
    arch = _meta(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (llmkit imports: "
                              f"{', '.join(SUPPORTED_ARCHS)})")
    cfg: dict[str, Any] = {"model_type": arch}
    for key, hf_key in GGUF_CONFIG[arch].items():
        value = _meta(reader, f"{arch}.{key}")
        if value is not None:
            cfg[hf_key] = value
    if "vocab_size" not in cfg:
        cfg["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    # llama.cpp leaves out `output.weight` when the head shares the embedding.
    cfg["tie_word_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
    return cfg


def gguf_hf_tensors(reader, hf_cfg: dict[str, Any], path: Path, dtype: torch.dtype) -> dict[str, Tensor]:
    """Every tensor dequantised (to fp32, then `dtype`) under its HF name, Q/K rows back in HF order."""
    from gguf.quants import dequantize

    arch = hf_cfg["model_type"]
    out: dict[str, Tensor] = {}
    for t in reader.tensors:
        name = gguf_to_hf_name(t.name, arch)
        if name is None:
            if t.name == "rope_freqs.weight":  # llama-3.1 rope scaling table: not supported, refuse loudly
                raise CheckpointError(f"{path}: rope frequency scaling (rope_freqs.weight) is not supported")
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a {arch} GGUF")
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{path}: tensor {t.name!r} uses {t.tensor_type.name}, which the gguf package "
                                  "cannot dequantize") from None
        except ValueError as e:
            raise CheckpointError(f"{path}: tensor {t.name!r} is unreadable ({str(e)[:120]})") from None
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape)).to(dtype)  # (out, in)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rotary(w, hf_cfg["num_attention_heads"])
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rotary(w, hf_cfg.get("num_key_value_heads", hf_cfg["num_attention_heads"]))
        elif hf_stores_transposed(name, arch):  # GPT-2's Conv1D: HF keeps (in, out)
            w = w.t()
        out[name] = w
    return out


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the spelling of byte-level BPE vocabularies)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def gguf_tokenizer(reader, path: Path) -> Tokenizer:
    """A `tokenizers` byte-level BPE equal to the model's own tokenizer.json, from `tokenizer.ggml.*`."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = _meta(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{path}: tokenizer model {kind!r} is not supported (llmkit reads byte-level BPE, "
                              "tokenizer.ggml.model = gpt2)")
    tokens: list[str] = _meta(reader, "tokenizer.ggml.tokens")
    types: list[int] = _meta(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _meta(reader, "tokenizer.ggml.merges") or []]
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    pre = _meta(reader, "tokenizer.ggml.pre", "default")
    if pre in PRE_TOKENIZER_SPLITS:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in DIGIT_SPLIT_PRE:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    def special(key: str) -> str | None:
        i = _meta(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    eos = special("eos")
    if eos is None:
        raise CheckpointError(f"{path}: no tokenizer.ggml.eos_token_id in the metadata")
    return Tokenizer(tk, eos_token=eos, pad_token=special("padding"), bos_token=special("bos"),
                     chat_template=_meta(reader, "tokenizer.chat_template"), kind="bpe",
                     add_bos=bool(_meta(reader, "tokenizer.ggml.add_bos_token", False)))


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> Converted:
    """A GGUF file -> Converted (llmkit config + dequantised weights + tokenizer with chat template)."""
    path = Path(path)
    reader = _open(path)
    try:
        hf_cfg = gguf_hf_config(reader, path)
        tokenizer = gguf_tokenizer(reader, path)
        hf = gguf_hf_tensors(reader, hf_cfg, path, dtype)
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed GGUF metadata ({type(e).__name__}: {str(e)[:120]})") from None
    cfg, weights = hf_weights_to_llmkit(hf_cfg, hf, str(path))
    source = {"format": "gguf", "path": str(path.resolve()), "name": _meta(reader, "general.name"),
              "file_type": _meta(reader, "general.file_type"), "dequantized_to": str(dtype).removeprefix("torch.")}
    return Converted(cfg, weights, tokenizer, source)
