"""The encoder–decoder (`arch: mbart`) in Hugging Face's `MBartForConditionalGeneration` layout.

Its rows join the one name-mapping table (`hf.TABLES["mbart"]`); `{e}` is an encoder layer index, `{i}` a
decoder one. Why mBART and what its quirks are: see model/seq2seq.py. This module also holds the config mapping
both ways and what an exported folder needs beyond the weights (a tokenizer that appends eos, as the model was
trained, and the decoder start token).
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors
from torch import Tensor

from llmkit.config import ModelConfig
from llmkit.errors import CheckpointError

Row = tuple[str, tuple[str, ...], bool]


def _norm(ours: str, theirs: str) -> list[Row]:
    return [(f"{ours}.{p}", (f"{theirs}.{p}",), False) for p in ("weight", "bias")]


def _attn(ours: str, theirs: str) -> list[Row]:
    """HF keeps q/k/v apart; llmkit fuses them into one `qkv` (cross-attention too: see Attention.project_kv)."""
    return [(f"{ours}.qkv.{p}", tuple(f"{theirs}.{n}_proj.{p}" for n in "qkv"), False) for p in ("weight", "bias")] \
        + [(f"{ours}.proj.{p}", (f"{theirs}.out_proj.{p}",), False) for p in ("weight", "bias")]


def _block(ours: str, theirs: str, cross: bool) -> list[Row]:
    rows = _norm(f"{ours}.norm1", f"{theirs}.self_attn_layer_norm") + _attn(f"{ours}.attn", f"{theirs}.self_attn")
    if cross:
        rows += _norm(f"{ours}.cross_norm", f"{theirs}.encoder_attn_layer_norm")
        rows += _attn(f"{ours}.cross_attn", f"{theirs}.encoder_attn")
    rows += _norm(f"{ours}.norm2", f"{theirs}.final_layer_norm")
    rows += [(f"{ours}.mlp.{a}.{p}", (f"{theirs}.{b}.{p}",), False)
             for a, b in (("fc", "fc1"), ("proj", "fc2")) for p in ("weight", "bias")]
    return rows


MBART_TABLE: list[Row] = [
    ("embed.weight", ("model.shared.weight",), False),
    ("enc_pos_embed.weight", ("model.encoder.embed_positions.weight",), False),
    *_norm("enc_embed_norm", "model.encoder.layernorm_embedding"),
    *_block("enc_blocks.{e}", "model.encoder.layers.{e}", cross=False),
    *_norm("enc_norm", "model.encoder.layer_norm"),
    ("dec_pos_embed.weight", ("model.decoder.embed_positions.weight",), False),
    *_norm("dec_embed_norm", "model.decoder.layernorm_embedding"),
    *_block("dec_blocks.{i}", "model.decoder.layers.{i}", cross=True),
    *_norm("dec_norm", "model.decoder.layer_norm"),
    ("lm_head.weight", ("lm_head.weight",), False),
]
# Tensors an mBART checkpoint may hold beyond the table: copies of the shared embedding (older saves write the
# tied names too) and the output bias, which must be zero (llmkit's head has none).
MBART_TIED_COPIES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
FINAL_LOGITS_BIAS = "final_logits_bias"


def mbart_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for MBartForConditionalGeneration. mBART's LayerNorms have a fixed eps (1e-5), biases
    everywhere and one head per key/value: other settings have no transformers equivalent."""
    if not cfg.bias or cfg.n_kv_head != cfg.n_head or cfg.norm_eps != 1e-5:
        raise CheckpointError(f"mbart export needs model.bias=true, n_kv_head == n_head and norm_eps 1e-5 (got bias="
                              f"{cfg.bias}, n_kv_head={cfg.n_kv_head}, n_head={cfg.n_head}, norm_eps={cfg.norm_eps})")
    return {
        "architectures": ["MBartForConditionalGeneration"], "model_type": "mbart", "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size, "d_model": cfg.n_embd, "max_position_embeddings": cfg.block_size,
        "encoder_layers": cfg.n_encoder_layer, "decoder_layers": cfg.n_layer,
        "encoder_attention_heads": cfg.n_head, "decoder_attention_heads": cfg.n_head,
        "encoder_ffn_dim": cfg.intermediate_size, "decoder_ffn_dim": cfg.intermediate_size,
        "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": cfg.tie_embeddings,
        "dropout": cfg.dropout, "attention_dropout": cfg.dropout, "activation_dropout": 0.0,
        # mBART's default forces eos at max_length: a silent rewrite of the last token; llmkit never does that.
        "forced_eos_token_id": None,
    }


def mbart_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """An mBART config.json -> ModelConfig, or a one-line error for what llmkit's blocks do not compute."""
    unsupported = {"activation_function": ("gelu", hf.get("activation_function", "gelu")),
                   "scale_embedding": (False, bool(hf.get("scale_embedding", False))),
                   "decoder_attention_heads": (hf["encoder_attention_heads"], hf["decoder_attention_heads"]),
                   "decoder_ffn_dim": (hf["encoder_ffn_dim"], hf["decoder_ffn_dim"])}
    for key, (want, got) in unsupported.items():
        if want != got:
            raise CheckpointError(f"mbart {key}={got!r} is not supported (llmkit's encoder–decoder needs {want!r})")
    return ModelConfig(
        arch="mbart", vocab_size=hf["vocab_size"], pad_vocab_multiple=1, block_size=hf["max_position_embeddings"],
        n_layer=hf["decoder_layers"], n_encoder_layer=hf["encoder_layers"], n_head=hf["encoder_attention_heads"],
        n_embd=hf["d_model"], intermediate_size=hf["encoder_ffn_dim"], bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), norm_eps=1e-5,
    )


def mbart_import_names(hf: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """Drop what the table does not map: tied copies of the shared embedding, and a zero final_logits_bias
    (a non-zero one would change every logit: refused)."""
    hf = dict(hf)
    if "model.shared.weight" not in hf and MBART_TIED_COPIES[0] in hf:
        hf["model.shared.weight"] = hf[MBART_TIED_COPIES[0]]
    for name in MBART_TIED_COPIES:
        hf.pop(name, None)
    bias = hf.pop(FINAL_LOGITS_BIAS, None)
    if bias is not None and bool(bias.any()):
        raise CheckpointError(f"{where}: final_logits_bias is not zero; llmkit's encoder–decoder head has no bias")
    return hf


def mbart_export_extras(cfg: ModelConfig) -> dict[str, Tensor]:
    """Tensors an exported folder carries beyond the table: the (zero) output bias transformers expects."""
    return {FINAL_LOGITS_BIAS: torch.zeros(1, cfg.vocab_size)}


def eos_appending(tk: HFTokenizer, eos: str, eos_id: int) -> HFTokenizer:
    """A copy of `tk` whose `tokenizer(text)` appends eos, as the model's sources and labels end
    (model/seq2seq.source_ids): transformers' AutoTokenizer then feeds the exported model what llmkit does."""
    out = HFTokenizer.from_str(tk.to_str())
    out.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1",
                                                       special_tokens=[(eos, eos_id)])
    return out
