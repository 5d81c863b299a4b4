"""Hugging Face <-> llmkit: the one name-mapping table, used in both directions.

Each row maps one llmkit parameter to one or more HF tensors. Several HF tensors are concatenated along the
output dimension (Llama's q/k/v become llmkit's fused `qkv`); GPT-2's Conv1D weights are stored transposed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llmkit.config import ModelConfig
from llmkit.errors import CheckpointError

# (llmkit name, HF names concatenated along dim 0, HF stores it transposed). `{i}` is the layer index.
GPT2_TABLE: list[tuple[str, tuple[str, ...], bool]] = [
    ("embed.weight", ("transformer.wte.weight",), False),
    ("pos_embed.weight", ("transformer.wpe.weight",), False),
    ("blocks.{i}.norm1.weight", ("transformer.h.{i}.ln_1.weight",), False),
    ("blocks.{i}.norm1.bias", ("transformer.h.{i}.ln_1.bias",), False),
    ("blocks.{i}.attn.qkv.weight", ("transformer.h.{i}.attn.c_attn.weight",), True),
    ("blocks.{i}.attn.qkv.bias", ("transformer.h.{i}.attn.c_attn.bias",), False),
    ("blocks.{i}.attn.proj.weight", ("transformer.h.{i}.attn.c_proj.weight",), True),
    ("blocks.{i}.attn.proj.bias", ("transformer.h.{i}.attn.c_proj.bias",), False),
    ("blocks.{i}.norm2.weight", ("transformer.h.{i}.ln_2.weight",), False),
    ("blocks.{i}.norm2.bias", ("transformer.h.{i}.ln_2.bias",), False),
    ("blocks.{i}.mlp.fc.weight", ("transformer.h.{i}.mlp.c_fc.weight",), True),
    ("blocks.{i}.mlp.fc.bias", ("transformer.h.{i}.mlp.c_fc.bias",), False),
    ("blocks.{i}.mlp.proj.weight", ("transformer.h.{i}.mlp.c_proj.weight",), True),
    ("blocks.{i}.mlp.proj.bias", ("transformer.h.{i}.mlp.c_proj.bias",), False),
    ("norm.weight", ("transformer.ln_f.weight",), False),
    ("norm.bias", ("transformer.ln_f.bias",), False),
    ("lm_head.weight", ("lm_head.weight",), False),
]

LLAMA_TABLE: list[tuple[str, tuple[str, ...], bool]] = [
    ("embed.weight", ("model.embed_tokens.weight",), False),
    ("blocks.{i}.norm1.weight", ("model.layers.{i}.input_layernorm.weight",), False),
    ("blocks.{i}.attn.qkv.weight", ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
                                    "model.layers.{i}.self_attn.v_proj.weight"), False),
    ("blocks.{i}.attn.qkv.bias", ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
                                  "model.layers.{i}.self_attn.v_proj.bias"), False),
    ("blocks.{i}.attn.proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",), False),
    ("blocks.{i}.norm2.weight", ("model.layers.{i}.post_attention_layernorm.weight",), False),
    ("blocks.{i}.mlp.fc.weight", ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), False),
    ("blocks.{i}.mlp.proj.weight", ("model.layers.{i}.mlp.down_proj.weight",), False),
    ("norm.weight", ("model.norm.weight",), False),
    ("lm_head.weight", ("lm_head.weight",), False),
]

TABLES = {"gpt2": GPT2_TABLE, "llama": LLAMA_TABLE}


def _rows(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], bool]]:
    """The table expanded over layers."""
    out = []
    for ours, theirs, transposed in TABLES[cfg.arch]:
        layers = range(cfg.n_layer) if "{i}" in ours else [None]
        for i in layers:
            fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
            out.append((fmt(ours), tuple(fmt(t) for t in theirs), transposed))
    return out


def from_hf_state_dict(hf: dict[str, Tensor], cfg: ModelConfig, expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF tensors -> llmkit state dict, for the parameters `expected` (a model's own state dict) holds."""
    out: dict[str, Tensor] = {}
    for ours, theirs, transposed in _rows(cfg):
        if ours not in expected:
            continue
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        missing = [t for t in theirs if t not in hf]
        if missing:
            if all(t.endswith(".bias") for t in theirs):
                continue  # optional biases
            raise CheckpointError(f"HF checkpoint lacks tensor {missing[0]!r} needed for {ours!r}")
        parts = [hf[t].t() if transposed else hf[t] for t in theirs]
        tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        want = expected[ours].shape
        if ours == "embed.weight" and tensor.shape[0] < want[0]:  # our table is padded for speed
            tensor = torch.cat([tensor, tensor.new_zeros(want[0] - tensor.shape[0], tensor.shape[1])])
        if tuple(tensor.shape) != tuple(want):
            raise CheckpointError(f"tensor {theirs[0]!r} has shape {tuple(tensor.shape)}, the config needs {tuple(want)}")
        out[ours] = tensor.contiguous()
    return out


def to_hf_state_dict(ours: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """llmkit state dict -> HF tensor names and layouts (vocabulary padding removed)."""
    out: dict[str, Tensor] = {}
    nh, nkv, hs, inter = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.intermediate_size
    for name, theirs, transposed in _rows(cfg):
        if name not in ours:
            continue
        t = ours[name]
        if name in ("embed.weight", "lm_head.weight"):
            t = t[: cfg.vocab_size]
        if len(theirs) == 3:  # fused qkv
            parts = t.split([nh * hs, nkv * hs, nkv * hs], dim=0)
        elif len(theirs) == 2:  # fused gate/up
            parts = t.split([inter, inter], dim=0)
        else:
            parts = (t,)
        for hf_name, part in zip(theirs, parts):
            out[hf_name] = (part.t() if transposed else part).contiguous()
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The `config.json` transformers needs to rebuild the same network."""
    if cfg.arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": cfg.intermediate_size, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "tie_word_embeddings": cfg.tie_embeddings,
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "hidden_act": "silu", "attention_bias": cfg.bias, "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": cfg.dropout,
    }


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """An HF `config.json` mapping -> llmkit ModelConfig (vocabulary kept exact, no padding)."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        return ModelConfig(
            arch="gpt2", vocab_size=hf["vocab_size"], pad_vocab_multiple=1, block_size=hf["n_positions"],
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner"),
            bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        )
    if kind in ("llama", "mistral", "qwen2"):
        if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
            raise CheckpointError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads is not supported")
        return ModelConfig(
            arch="llama", vocab_size=hf["vocab_size"], pad_vocab_multiple=1,
            block_size=hf.get("max_position_embeddings", 2048), n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads"), n_embd=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], bias=hf.get("attention_bias", False),
            tie_embeddings=hf.get("tie_word_embeddings", False), norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        )
    raise CheckpointError(f"unknown architecture model_type={kind!r} (llmkit imports: gpt2, llama)")
