"""Builders for conversion tests: tiny llmkit run folders, tiny GGUF files written the llama.cpp way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftest import tiny_model_config
from llmkit.config import RunConfig, save_yaml
from llmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer
from llmkit.model import build_model
from llmkit.model.weights import save_weights, weights_for_save

CHAT_SPECIALS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")


def chat_tokenizer(text: str, vocab_size: int = 300) -> Tokenizer:
    """A small byte-level BPE with ChatML special tokens and template, eos = <|im_end|>."""
    tok = Tokenizer.train_bpe([text], vocab_size=vocab_size, special_tokens=CHAT_SPECIALS)
    return Tokenizer(tok.tk, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token="<|im_start|>",
                     chat_template=DEFAULT_CHAT_TEMPLATE)


def make_run_folder(out: Path, arch: str, tok: Tokenizer, seed: int = 0, **kw) -> Path:
    """A random-init llmkit run folder (config.yaml, model.safetensors, tokenizer/) of a tiny model."""
    torch.manual_seed(seed)
    cfg = tiny_model_config(arch, vocab_size=tok.vocab_size, **kw)
    model = build_model(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(RunConfig(model=cfg), out / "config.yaml")
    save_weights(model, out / "model.safetensors")
    tok.save(out / "tokenizer")
    return out


def make_classifier_run(out: Path, arch: str, tok: Tokenizer, labels: tuple[str, ...] = ("neg", "pos")) -> Path:
    """A run folder shaped like `llmkit finetune --task classify` writes: backbone.* + classifier.* weights and a
    config with a finetune section (random weights: for tests of what verbs accept, not of predictions)."""
    from llmkit.config import FinetuneConfig, FinetuneRunConfig, TrainConfig

    torch.manual_seed(0)
    cfg = tiny_model_config(arch, vocab_size=tok.vocab_size)
    weights = {f"backbone.{k}": v for k, v in weights_for_save(build_model(cfg)).items()}
    weights.update({"classifier.weight": torch.randn(len(labels), cfg.n_embd),
                    "classifier.bias": torch.zeros(len(labels))})
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(FinetuneRunConfig(model=cfg, train=TrainConfig(objective="classify"),
                                finetune=FinetuneConfig(labels=list(labels), pooling="mean")), out / "config.yaml")
    save_weights(weights, out / "model.safetensors")
    tok.save(out / "tokenizer")
    return out


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows (interleave rotary halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, hf_state: dict[str, torch.Tensor], hf_cfg: dict, tok: Tokenizer,
                    quant: str = "F32", arch: str = "llama", add_bos: bool = False) -> Path:
    """A GGUF file of an HF Llama state dict, with tokenizer metadata, the way llama.cpp writes one."""
    import gguf

    from llmkit.interop.hf import GGUF_LLAMA_NAMES

    to_gguf = {}
    for g, h in GGUF_LLAMA_NAMES.items():
        for i in range(hf_cfg["num_hidden_layers"]) if "{i}" in g else [None]:
            to_gguf[h.format(i=i)] = g.format(i=i)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hf_cfg["num_hidden_layers"])
    w.add_context_length(hf_cfg["max_position_embeddings"])
    w.add_embedding_length(hf_cfg["hidden_size"])
    w.add_feed_forward_length(hf_cfg["intermediate_size"])
    w.add_head_count(hf_cfg["num_attention_heads"])
    w.add_head_count_kv(hf_cfg["num_key_value_heads"])
    w.add_rope_freq_base(hf_cfg.get("rope_theta") or hf_cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(hf_cfg["rms_norm_eps"])
    w.add_rope_dimension_count(hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t.content for t in tok.tk.get_added_tokens_decoder().values()}
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    import json

    w.add_token_merges([" ".join(m) if isinstance(m, list) else m
                        for m in json.loads(tok.tk.to_str())["model"]["merges"]])
    w.add_eos_token_id(tok.eos_id)
    w.add_bos_token_id(tok.bos_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(tok.chat_template)
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    for name, t in hf_state.items():
        if name == "lm_head.weight" and hf_cfg.get("tie_word_embeddings"):
            continue
        arr = t.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            arr = llama_cpp_permute(arr, hf_cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            arr = llama_cpp_permute(arr, hf_cfg["num_key_value_heads"])
        if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(to_gguf[name], arr.astype(np.float32))
        else:
            q = gguf.quants.quantize(arr, qtype)
            w.add_tensor(to_gguf[name], q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
