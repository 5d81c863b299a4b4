"""Hugging Face <-> llmkit: the one name-mapping table, used in both directions.

Each row maps one llmkit parameter to one or more HF tensors. Several HF tensors are concatenated along the
output dimension (Llama's q/k/v become llmkit's fused `qkv`); GPT-2's Conv1D weights are stored transposed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llmkit.config import ModelConfig
from llmkit.config.sections import ROPE_SCALING_KEYS
from llmkit.errors import CheckpointError
from llmkit.interop.hf_mbart import MBART_TABLE, mbart_config_from_hf, mbart_hf_config

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
    ("blocks.{i}.attn.qkv.weight", ("model.layers.{i}.self_attn.q_proj.weight",
                                    "model.layers.{i}.self_attn.k_proj.weight",
                                    "model.layers.{i}.self_attn.v_proj.weight"), False),
    ("blocks.{i}.attn.qkv.bias", ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
                                  "model.layers.{i}.self_attn.v_proj.bias"), False),
    ("blocks.{i}.attn.proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",), False),
    ("blocks.{i}.attn.proj.bias", ("model.layers.{i}.self_attn.o_proj.bias",), False),
    ("blocks.{i}.norm2.weight", ("model.layers.{i}.post_attention_layernorm.weight",), False),
    ("blocks.{i}.mlp.fc.weight", ("model.layers.{i}.mlp.gate_proj.weight",
                                  "model.layers.{i}.mlp.up_proj.weight"), False),
    ("blocks.{i}.mlp.fc.bias", ("model.layers.{i}.mlp.gate_proj.bias", "model.layers.{i}.mlp.up_proj.bias"), False),
    ("blocks.{i}.mlp.proj.weight", ("model.layers.{i}.mlp.down_proj.weight",), False),
    ("blocks.{i}.mlp.proj.bias", ("model.layers.{i}.mlp.down_proj.bias",), False),
    ("norm.weight", ("model.norm.weight",), False),
    ("lm_head.weight", ("lm_head.weight",), False),
]

# BERT in the `BertForPreTraining` layout; a bare `BertModel` checkpoint (no `bert.` prefix) is read the same way
# (see `bert_names`). HF keeps q/k/v apart; llmkit fuses them into `qkv` like Llama's.
_B = "bert.encoder.layer.{i}."
BERT_TABLE: list[tuple[str, tuple[str, ...], bool]] = [
    ("embed.weight", ("bert.embeddings.word_embeddings.weight",), False),
    ("pos_embed.weight", ("bert.embeddings.position_embeddings.weight",), False),
    ("type_embed.weight", ("bert.embeddings.token_type_embeddings.weight",), False),
    ("embed_norm.weight", ("bert.embeddings.LayerNorm.weight",), False),
    ("embed_norm.bias", ("bert.embeddings.LayerNorm.bias",), False),
    ("blocks.{i}.attn.qkv.weight", tuple(_B + f"attention.self.{n}.weight" for n in ("query", "key", "value")), False),
    ("blocks.{i}.attn.qkv.bias", tuple(_B + f"attention.self.{n}.bias" for n in ("query", "key", "value")), False),
    ("blocks.{i}.attn.proj.weight", (_B + "attention.output.dense.weight",), False),
    ("blocks.{i}.attn.proj.bias", (_B + "attention.output.dense.bias",), False),
    ("blocks.{i}.norm1.weight", (_B + "attention.output.LayerNorm.weight",), False),
    ("blocks.{i}.norm1.bias", (_B + "attention.output.LayerNorm.bias",), False),
    ("blocks.{i}.mlp.fc.weight", (_B + "intermediate.dense.weight",), False),
    ("blocks.{i}.mlp.fc.bias", (_B + "intermediate.dense.bias",), False),
    ("blocks.{i}.mlp.proj.weight", (_B + "output.dense.weight",), False),
    ("blocks.{i}.mlp.proj.bias", (_B + "output.dense.bias",), False),
    ("blocks.{i}.norm2.weight", (_B + "output.LayerNorm.weight",), False),
    ("blocks.{i}.norm2.bias", (_B + "output.LayerNorm.bias",), False),
    ("pooler.weight", ("bert.pooler.dense.weight",), False),
    ("pooler.bias", ("bert.pooler.dense.bias",), False),
    ("mlm.dense.weight", ("cls.predictions.transform.dense.weight",), False),
    ("mlm.dense.bias", ("cls.predictions.transform.dense.bias",), False),
    ("mlm.norm.weight", ("cls.predictions.transform.LayerNorm.weight",), False),
    ("mlm.norm.bias", ("cls.predictions.transform.LayerNorm.bias",), False),
    ("mlm.decoder.weight", ("cls.predictions.decoder.weight",), False),
    ("mlm.bias", ("cls.predictions.bias",), False),
    ("nsp.weight", ("cls.seq_relationship.weight",), False),
    ("nsp.bias", ("cls.seq_relationship.bias",), False),
]
# Heads a checkpoint may lack (a sentence-embedding BertModel has no pre-training heads): they keep their init.
OPTIONAL_HF_PREFIXES = ("cls.", "bert.pooler.")
TIED_HEADS = ("lm_head.weight", "mlm.decoder.weight")  # shared with embed.weight when tie_embeddings
VOCAB_ROWS = ("embed.weight", "lm_head.weight", "mlm.decoder.weight", "mlm.bias")  # padded to the vocab multiple

TABLES = {"gpt2": GPT2_TABLE, "llama": LLAMA_TABLE, "bert": BERT_TABLE, "mbart": MBART_TABLE}


def bert_names(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """A bare `BertModel` state dict (`embeddings.*`, `encoder.*`) -> the `bert.`-prefixed pre-training layout."""
    if any(k.startswith("bert.") for k in hf):
        return hf
    return {(k if k.startswith("cls.") else "bert." + k): v for k, v in hf.items()}

# GGUF (llama.cpp) tensor names -> HF names, so a GGUF file goes GGUF -> HF -> llmkit through the tables above.
# llama.cpp stores attn_q/attn_k with the rotary halves interleaved; `gguf_import.unpermute_rotary` undoes it.
GGUF_LLAMA_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    # Optional biases (llama.cpp's llama graph adds them when present; Qwen2-style q/k/v biases).
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_gate.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "blk.{i}.ffn_up.bias": "model.layers.{i}.mlp.up_proj.bias",
    "blk.{i}.ffn_down.bias": "model.layers.{i}.mlp.down_proj.bias",
}

# GPT-2 in llama.cpp's names. llama.cpp stores Conv1D weights as (out, in), HF as (in, out): see
# `hf_stores_transposed`.
GGUF_GPT2_NAMES: dict[str, str] = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
    **{f"blk.{{i}}.{g}.{kind}": f"transformer.h.{{i}}.{h}.{kind}"
       for g, h in (("attn_norm", "ln_1"), ("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"),
                    ("ffn_norm", "ln_2"), ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj"))
       for kind in ("weight", "bias")},
}
GGUF_NAMES: dict[str, dict[str, str]] = {"llama": GGUF_LLAMA_NAMES, "gpt2": GGUF_GPT2_NAMES}

# GGUF metadata keys (after the `{arch}.` prefix) -> HF config.json keys, for the llama family.
GGUF_LLAMA_CONFIG: dict[str, str] = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}


# GPT-2's GGUF metadata keys -> HF GPT2Config keys.
GGUF_GPT2_CONFIG: dict[str, str] = {
    "context_length": "n_positions",
    "block_count": "n_layer",
    "feed_forward_length": "n_inner",
    "embedding_length": "n_embd",
    "attention.head_count": "n_head",
    "attention.layer_norm_epsilon": "layer_norm_epsilon",
    "vocab_size": "vocab_size",
}
GGUF_CONFIG: dict[str, dict[str, str]] = {"llama": GGUF_LLAMA_CONFIG, "gpt2": GGUF_GPT2_CONFIG}


def _layer_template(name: str) -> tuple[str, str | None]:
    """`model.layers.3.mlp.up_proj.weight` -> (`model.layers.{i}.mlp.up_proj.weight`, "3"): the first all-digit
    part is the layer index in every naming scheme here."""
    parts = name.split(".")
    for k, p in enumerate(parts):
        if p.isdigit():
            return ".".join([*parts[:k], "{i}", *parts[k + 1:]]), p
    return name, None


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for names the table lacks."""
    template, i = _layer_template(name)
    theirs = GGUF_NAMES[arch].get(template)
    return theirs.format(i=i) if theirs else None


def hf_to_gguf_name(name: str, arch: str) -> str | None:
    """The inverse of `gguf_to_hf_name`, for GGUF export: `model.layers.3.self_attn.q_proj.weight` ->
    `blk.3.attn_q.weight`."""
    template, i = _layer_template(name)
    ours = {h: g for g, h in GGUF_NAMES[arch].items()}.get(template)
    return ours.format(i=i) if ours else None


def hf_stores_transposed(name: str, arch: str) -> bool:
    """Whether HF keeps this tensor as (in, out) (GPT-2's Conv1D) where llmkit and llama.cpp keep (out, in)."""
    template, _ = _layer_template(name)
    return any(transposed and template in theirs for _, theirs, transposed in TABLES[arch])


def _rows(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], bool]]:
    """The table expanded over layers (`{e}`: an encoder–decoder's encoder layers, `{i}`: all others)."""
    out = []
    for ours, theirs, transposed in TABLES[cfg.arch]:
        layers = range(cfg.n_encoder_layer) if "{e}" in ours else range(cfg.n_layer) if "{i}" in ours else [None]
        for i in layers:
            names = (ours, *theirs) if i is None else tuple(n.format(i=i, e=i) for n in (ours, *theirs))
            out.append((names[0], names[1:], transposed))
    return out


def from_hf_state_dict(hf: dict[str, Tensor], cfg: ModelConfig, expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF tensors -> llmkit state dict, for the parameters `expected` (a model's own state dict) holds."""
    out: dict[str, Tensor] = {}
    if cfg.arch == "bert":
        hf = bert_names(hf)
    for ours, theirs, transposed in _rows(cfg):
        if ours not in expected:
            continue
        if ours in TIED_HEADS and cfg.tie_embeddings:
            continue
        missing = [t for t in theirs if t not in hf]
        if missing:
            if all(t.endswith(".bias") for t in theirs) or theirs[0].startswith(OPTIONAL_HF_PREFIXES):
                continue  # optional biases, and heads a bare BertModel lacks
            raise CheckpointError(f"HF checkpoint lacks tensor {missing[0]!r} needed for {ours!r}")
        parts = [hf[t].t() if transposed else hf[t] for t in theirs]
        tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        want = expected[ours].shape
        if ours in VOCAB_ROWS and tensor.shape[0] < want[0]:  # our table is padded for speed
            tensor = torch.cat([tensor, tensor.new_zeros(want[0] - tensor.shape[0], *tensor.shape[1:])])
        if tuple(tensor.shape) != tuple(want):
            what = f"tensor {theirs[0]!r} has" if len(theirs) == 1 else f"tensors {' + '.join(map(repr, theirs))} have"
            raise CheckpointError(f"{what} shape {tuple(tensor.shape)}, the config needs {tuple(want)}")
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
        if name in VOCAB_ROWS:
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
        out.pop("cls.predictions.decoder.weight", None)
    return out


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The `config.json` transformers needs to rebuild the same network."""
    if cfg.arch != "llama" and cfg.n_head * cfg.head_dim != cfg.n_embd:
        raise CheckpointError(f"{cfg.arch} with head_dim {cfg.head_dim} != n_embd / n_head ({cfg.n_embd} / "
                              f"{cfg.n_head}) has no transformers equivalent (only the llama flavour stores head_dim)")
    if cfg.arch == "mbart":
        return mbart_hf_config(cfg)
    if cfg.arch == "bert":
        return {
            "architectures": ["BertForPreTraining"], "model_type": "bert", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "intermediate_size": cfg.intermediate_size, "hidden_act": "gelu", "max_position_embeddings": cfg.block_size,
            "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.norm_eps, "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": cfg.dropout, "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": 0,
        }
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
        "hidden_act": "silu", "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": cfg.dropout,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
    }


def rope_scaling_from_hf(rope: dict[str, Any]) -> dict[str, Any] | None:
    """HF `rope_scaling` / `rope_parameters` -> ModelConfig.rope_scaling (None for plain rotary); a one-line
    error naming any other rope_type (yarn, dynamic, longrope...), which llmkit does not compute."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ROPE_SCALING_KEYS:
        raise CheckpointError(f"rope_scaling rope_type {kind!r} is not supported (llmkit computes: default, "
                              f"{', '.join(ROPE_SCALING_KEYS)})")
    return {"rope_type": kind, **{k: rope[k] for k in ROPE_SCALING_KEYS[kind] if k in rope}}


def _check_full_attention(hf: dict[str, Any], kind: str, block_size: int) -> None:
    """Sliding-window attention (Mistral, Qwen2 with use_sliding_window) is full attention when the window
    covers the whole context; a shorter window would need a banded mask llmkit does not have."""
    window = hf.get("sliding_window")
    if kind == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if kind in ("mistral", "qwen2") and window is not None and window < block_size:
        raise CheckpointError(f"{kind} sliding_window={window} is shorter than the context "
                              f"(max_position_embeddings={block_size}); llmkit has no sliding-window attention")


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
        block_size = hf.get("max_position_embeddings", 2048)
        _check_full_attention(hf, kind, block_size)
        rope = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}  # transformers 5 / 4 keys
        return ModelConfig(
            arch="llama", vocab_size=hf["vocab_size"], pad_vocab_multiple=1, block_size=block_size,
            n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads"), n_embd=hf["hidden_size"], head_dim=hf.get("head_dim"),
            intermediate_size=hf["intermediate_size"],
            # Qwen2 has q/k/v biases (no flag for them); o_proj and MLP biases it lacks load as zeros.
            bias=True if kind == "qwen2" else hf.get("attention_bias", False) or hf.get("mlp_bias", False),
            tie_embeddings=hf.get("tie_word_embeddings", False), norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)), rope_scaling=rope_scaling_from_hf(rope),
        )
    if kind == "bert":
        if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError("only BERT with exact GELU and absolute positions is supported "
                                  f"(hidden_act={hf.get('hidden_act')!r}, {hf.get('position_embedding_type')!r})")
        return ModelConfig(
            arch="bert", vocab_size=hf["vocab_size"], pad_vocab_multiple=1, block_size=hf["max_position_embeddings"],
            n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
            norm_eps=hf.get("layer_norm_eps", 1e-12), type_vocab_size=hf.get("type_vocab_size", 2),
        )
    if kind == "mbart":
        return mbart_config_from_hf(hf)
    raise CheckpointError(f"unknown architecture model_type={kind!r} (llmkit imports: gpt2, llama, bert, mbart)")
