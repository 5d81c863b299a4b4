"""GGUF (llama.cpp) export: an llmkit model as one `.gguf` file llama.cpp runs, written with the `gguf` package.

The inverse of `interop/gguf.py`, on the same road: llmkit -> HF names and layouts (`hf.to_hf_state_dict`) ->
llama.cpp names (`hf.hf_to_gguf_name`, the one table read backwards). Two llama.cpp conventions are applied:
  * Q and K rows (and biases) of Llama are permuted so each head's rotary halves are interleaved (`permute_rotary`,
    what llama.cpp's convert_hf_to_gguf.py does; `gguf.unpermute_rotary` undoes it on import);
  * GPT-2's weights are (out, in), as llama.cpp keeps them (HF's Conv1D keeps them transposed).
The tokenizer goes in as `tokenizer.ggml.*` metadata: tokens in GPT-2's byte spelling (byte-level BPE vocabularies
are already spelled so), merges as "a b" strings, token types, special ids, the chat template, and the
pre-tokenizer's llama.cpp name. Quantisation is the `gguf` package's own (`gguf.quants.quantize`, bit-exact with
llama.cpp's reference quantizer):
  * f16: every matrix F16; norms and biases stay F32 (llama.cpp never quantizes 1-D tensors).
  * q8_0: blocks of 32 weights, one fp16 scale each (8.5 bits per weight).
  * q4_0: blocks of 32, 4-bit codes and one fp16 scale (4.5 bits per weight); the output head (the token embedding
    when the head is tied to it) is Q8_0, where llama.cpp's own quantizer puts Q6_K, a type the `gguf` package
    cannot write. A matrix whose rows are not a multiple of 32 stays F16, as llama.cpp does.
GPT-2's position embeddings stay F32 (llama.cpp does not quantize them either).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmkit.config import ModelConfig
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import CheckpointError
from llmkit.files import atomic_write
from llmkit.interop.gguf import _LLAMA3_SPLIT, CONTROL, USER_DEFINED
from llmkit.interop.hf import GPT2_TABLE, hf_stores_transposed, hf_to_gguf_name, to_hf_state_dict
from llmkit.interop.run_folder import Converted
from llmkit.interop.sources import read_any

QUANTS = ("f16", "q8_0", "q4_0")
NORMAL, UNUSED = 1, 5  # llama.cpp token types (CONTROL, USER_DEFINED come from the import)
BLOCK = 32  # weights per Q8_0 / Q4_0 block
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION for the Q4_0 / Q8_0 block layouts


def permute_rotary(w: Tensor, n_head: int) -> Tensor:
    """(n_head * hs, ...) HF Q/K rows -> llama.cpp order: per head, (2, hs/2) halves -> (hs/2, 2) interleaved."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _check_exportable(conv: Converted, src: str | Path) -> None:
    """One-line errors for what llama.cpp cannot represent, before anything is written."""
    cfg = conv.cfg
    if conv.is_classifier or cfg.arch == "bert":
        raise CheckpointError(f"{src}: {conv.describe()}; GGUF export writes decoders (gpt2, llama)")
    if cfg.rope_scaling:
        raise CheckpointError(f"{src}: rope_scaling {cfg.rope_scaling.get('rope_type')!r} is not exported to GGUF "
                              "(llama.cpp keeps it as a rope_freqs tensor llmkit does not write); export to hf instead")
    if cfg.vocab_size < conv.tokenizer.vocab_size:
        raise CheckpointError(f"{src}: the tokenizer has {conv.tokenizer.vocab_size} tokens, the model's embedding "
                              f"only {cfg.vocab_size}; llama.cpp needs a row for every token")


def pre_tokenizer_name(tok: Tokenizer, src: str | Path) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for this tokenizer's pre-tokenizer, the names the import reads."""
    data = json.loads(tok.tk.to_str())
    model = data.get("model") or {}
    if tok.kind not in ("bpe", "gpt2") or model.get("type") != "BPE" or model.get("byte_fallback"):
        raise CheckpointError(f"{src}: GGUF export writes byte-level BPE tokenizers; this model's is {tok.kind!r} "
                              "(retrain it with `llmkit tokenizer train --kind bpe`)")
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    raise CheckpointError(f"{src}: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) has no llama.cpp "
                          "name llmkit knows (gpt-2, smollm, llama-bpe); llama.cpp would split text differently")


def tokenizer_metadata(tok: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """tokens (by id, padded with unused `[PAD{i}]` up to the embedding's rows), token types and merges."""
    data = json.loads(tok.tk.to_str())
    by_id = {i: t for t, i in tok.tk.get_vocab(with_added_tokens=True).items()}
    added = {i: a for i, a in tok.tk.get_added_tokens_decoder().items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # a gap in the ids or the model's extra rows: llama.cpp needs one token per row
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(NORMAL if i not in added else CONTROL if added[i].special else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def _qtype(name: str, arr: np.ndarray, quant: str, head: str):
    """The GGML type of one tensor under `quant` (see the module docstring for the rules)."""
    from gguf import GGMLQuantizationType as Q

    if arr.ndim == 1 or name == "position_embd.weight":
        return Q.F32
    if quant == "f16" or arr.shape[-1] % BLOCK:
        return Q.F16
    if quant == "q8_0" or name == head:
        return Q.Q8_0
    return Q.Q4_0


def _add_zero_biases(hf: dict[str, Tensor], cfg: ModelConfig) -> None:
    """GPT-2 built without biases (`model.bias: false`): zero biases under every GPT-2 bias name."""
    for _, theirs, _ in GPT2_TABLE:
        for template in (t for t in theirs if t.endswith(".bias")):
            for i in range(cfg.n_layer) if "{i}" in template else [None]:
                name = template.format(i=i)
                weight = name.removesuffix(".bias") + ".weight"
                rows = hf[weight].shape[1 if hf_stores_transposed(weight, "gpt2") else 0]
                hf.setdefault(name, torch.zeros(rows))


@torch.no_grad()
def round_like_export(model: torch.nn.Module, quant: str) -> torch.nn.Module:
    """`model` (in place) with every matrix rounded as `export_gguf` stores it, through the same `gguf.quants`
    blocks: the logits an exported file must give back (benches and checks compare against it)."""
    import gguf

    cfg = model.cfg
    for name, p in model.named_parameters():  # a tied head appears once, as embed.weight
        gname = {"embed.weight": "token_embd.weight", "lm_head.weight": "output.weight",
                 "pos_embed.weight": "position_embd.weight"}.get(name, name)
        head = "token_embd.weight" if cfg.tie_embeddings else "output.weight"
        w = p.detach().float().cpu().numpy()
        qtype = _qtype(gname, w, quant, head)
        if qtype != gguf.GGMLQuantizationType.F32:
            back = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)
            p.copy_(torch.from_numpy(back).to(p.dtype))
    return model


def gguf_tensors(conv: Converted) -> dict[str, np.ndarray]:
    """llmkit weights -> float32 arrays under llama.cpp names and layouts, in a stable order."""
    cfg = conv.cfg
    hf = to_hf_state_dict({k: v.float() for k, v in conv.backbone_weights().items()}, cfg)
    if cfg.arch == "gpt2" and not cfg.bias:  # llama.cpp's GPT-2 graph requires every bias: zeros change nothing
        _add_zero_biases(hf, cfg)
    out: dict[str, np.ndarray] = {}
    for name, t in hf.items():
        gname = hf_to_gguf_name(name, cfg.arch)
        if gname is None:
            raise CheckpointError(f"tensor {name!r} has no llama.cpp name for a {cfg.arch} model")
        if cfg.arch == "llama" and ".q_proj." in name:
            t = permute_rotary(t, cfg.n_head)
        elif cfg.arch == "llama" and ".k_proj." in name:
            t = permute_rotary(t, cfg.n_kv_head)
        elif hf_stores_transposed(name, cfg.arch):
            t = t.t()
        out[gname] = t.contiguous().numpy()
    return out


def _write_config(w, cfg: ModelConfig) -> None:
    """`{arch}.*` hyper-parameters, the keys the import's GGUF_CONFIG tables read back."""
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
        return
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.n_head != cfg.n_embd:  # pruned heads: llama.cpp reads the head width from these
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)


def _write_tokenizer(w, tok: Tokenizer, cfg: ModelConfig, pre: str) -> None:
    meta = tokenizer_metadata(tok, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    w.add_token_merges(meta["merges"])
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    w.add_add_bos_token(tok.add_bos)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def export_gguf(conv: Converted, dst: str | Path, quant: str = "f16", name: str | None = None,
                src: str | Path = "model", quiet: bool = False) -> dict[str, Any]:
    """Write `conv` as a GGUF file at `dst` (atomically; nothing is left there on failure). Returns a summary:
    path, bytes, quant and how many tensors got each GGML type."""
    import gguf
    from tqdm import tqdm

    dst = Path(dst)
    if quant not in QUANTS:
        raise CheckpointError(f"--quant {quant!r}: valid GGUF types are {', '.join(QUANTS)}")
    if dst.suffix != ".gguf" or dst.is_dir():
        raise CheckpointError(f"--out {dst}: give a file name ending in .gguf")
    _check_exportable(conv, src)
    pre = pre_tokenizer_name(conv.tokenizer, src)
    tensors = gguf_tensors(conv)
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    types: Counter[str] = Counter()

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, conv.cfg.arch)
        w.add_name(name or Path(str(src)).stem)
        w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                         "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])
        if quant != "f16":
            w.add_quantization_version(QUANTIZATION_VERSION)
        _write_config(w, conv.cfg)
        _write_tokenizer(w, conv.tokenizer, conv.cfg, pre)
        for tname, arr in tqdm(tensors.items(), desc=f"GGUF {quant}", unit="tensor", file=sys.stderr,
                               disable=quiet or None):
            qtype = _qtype(tname, arr, quant, head)
            types[qtype.name] += 1
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                w.add_tensor(tname, gguf.quants.quantize(arr, qtype))
            else:
                q = gguf.quants.quantize(arr, qtype)  # (rows, bytes per row) uint8 blocks
                w.add_tensor(tname, q, raw_shape=q.shape, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(dst, write)
    return {"path": str(dst), "bytes": dst.stat().st_size, "quant": quant, "tensor_types": dict(types)}


def write_gguf(src: str | Path, dst: str | Path, quant: str = "f16", quiet: bool = False) -> dict[str, Any]:
    """`llmkit convert --to gguf`: any model llmkit reads (run folder, HF folder, .gguf, built-in) -> a GGUF file."""
    if quant not in QUANTS:  # before the (slow) read
        raise CheckpointError(f"--quant {quant!r}: valid GGUF types are {', '.join(QUANTS)}")
    conv = read_any(src, quiet=quiet)
    conv = _dequantized(conv)
    return export_gguf(conv, dst, quant=quant, src=src, quiet=quiet)


def _dequantized(conv: Converted) -> Converted:
    """A weight-only quantized run folder (`llmkit quantize`) back in float, so it can be re-quantized the
    llama.cpp way (rounding twice: the file carries both errors); other models pass through."""
    from llmkit.model.quant import dequantize_state, is_quantized

    if is_quantized(conv.weights):
        conv.weights = dequantize_state(conv.weights)
    return conv
