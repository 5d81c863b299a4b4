"""Hugging Face model folders (config.json + safetensors + tokenizer files), read and written.

Every rename goes through the tables in `hf.py`. Only safetensors are read (never pickled `.bin` files), so a
checkpoint cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmkit.config import ModelConfig
from llmkit.data.tokenizer import END_OF_TURN_TOKENS, Tokenizer, end_of_turn_ids
from llmkit.data.wordpiece import wrap_bert_tokenizer
from llmkit.errors import CheckpointError, DataError, LLMKitError
from llmkit.files import atomic_dir, atomic_write_text, read_json
from llmkit.interop.hf import _rows, bert_names, from_hf_state_dict, hf_config, model_config_from_hf, to_hf_state_dict
from llmkit.interop.hf_mbart import eos_appending, mbart_export_extras, mbart_import_names
from llmkit.interop.run_folder import Converted, check_replaceable
from llmkit.model import expected_shapes
from llmkit.model.seq2seq import decoder_start_id
from llmkit.model.weights import load_weights, save_weights

# HF tensors that are buffers rebuilt from the config, not weights: safe to ignore on import.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq", "embeddings.position_ids",
               "embeddings.token_type_ids")
HF_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "bert", "mbart")


def read_safetensors_folder(src: Path) -> dict[str, Tensor]:
    """All weights of an HF folder: `model.safetensors`, or the shards a `*.safetensors.index.json` names."""
    index = next(iter(sorted(src.glob("*.safetensors.index.json"))), None)
    if index is not None:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map in the shard index")
        files = [src / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: names shard {f.name}, which is missing")
    else:
        files = sorted(src.glob("*.safetensors"))
    if not files:
        has_bin = any(src.glob("*.bin"))
        raise CheckpointError(f"{src}: no *.safetensors weights" + (" (llmkit never unpickles .bin files; "
                              "convert them to safetensors with transformers first)" if has_bin else ""))
    tensors: dict[str, Tensor] = {}
    for f in files:
        tensors.update(load_weights(f))  # one-line error naming the file if it is truncated
    return tensors


def read_hf_tokenizer(src: Path, hf_cfg: dict[str, Any] | None = None) -> Tokenizer:
    """Tokenizer of an HF folder: tokenizer.json (or GPT-2's vocab.json + merges.txt) plus special tokens and
    the chat template from tokenizer_config.json / chat_template.jinja."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    if (src / "tokenizer.json").is_file():
        try:
            tk = HFTokenizer.from_file(str(src / "tokenizer.json"))
        except Exception as e:
            raise DataError(f"{src / 'tokenizer.json'}: not a valid tokenizer ({str(e).splitlines()[0][:160]})") \
                from None
    elif (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        tk = HFTokenizer(models.BPE.from_file(str(src / "vocab.json"), str(src / "merges.txt")))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
    else:
        raise DataError(f"{src}: no tokenizer.json (or vocab.json + merges.txt) to go with the weights")
    tc = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    if (src / "special_tokens_map.json").is_file():
        tc = {**read_json(src / "special_tokens_map.json"), **tc}

    def token(key: str) -> str | None:
        v = tc.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if v is None and hf_cfg and isinstance(hf_cfg.get(f"{key}_id"), int):
            v = tk.id_to_token(hf_cfg[f"{key}_id"])  # config.json knows the id when the tokenizer config does not
        return v

    template = tc.get("chat_template")
    if (src / "chat_template.jinja").is_file():  # where transformers 5 saves it
        template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # several named templates: take the default
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    eos = token("eos_token") or next((t for t in END_OF_TURN_TOKENS if tk.token_to_id(t) is not None), None)
    if eos is None:
        raise DataError(f"{src}: the tokenizer names no eos_token")
    bos = token("bos_token")
    add_bos = tc.get("add_bos_token")
    if not isinstance(add_bos, bool):  # no explicit setting: does tokenizer.json's post-processor put BOS first?
        bos_id = tk.token_to_id(bos) if bos else None
        add_bos = bos_id is not None and tk.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    return Tokenizer(tk, eos_token=eos, pad_token=token("pad_token"), bos_token=bos, chat_template=template,
                     kind="bpe", add_bos=add_bos)


def hf_weights_to_llmkit(hf_cfg: dict[str, Any], hf: dict[str, Tensor], where: str) -> tuple[ModelConfig, dict]:
    """Config + HF-named tensors -> llmkit config + weights, with one-line errors prefixed by `where`."""
    if hf_cfg.get("model_type") == "bert":
        hf = bert_names(hf)
    elif hf_cfg.get("model_type") == "mbart":
        hf = mbart_import_names(hf, where)
    else:
        prefix = "transformer." if hf_cfg.get("model_type") == "gpt2" else "model."
        if not any(k.startswith(prefix) for k in hf):  # a bare GPT2Model/LlamaModel save (the hub's gpt2 is one)
            hf = {(k if k == "lm_head.weight" else prefix + k): v for k, v in hf.items()}
    try:
        cfg = model_config_from_hf(hf_cfg)
        ours = from_hf_state_dict(hf, cfg, expected_shapes(cfg))
    except LLMKitError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{where}: config lacks {e.args[0]!r}") from None
    used = {t for _, theirs, _ in _rows(cfg) for t in theirs}
    extra = sorted(n for n in hf if n not in used and not n.endswith(_HF_BUFFERS))
    if cfg.tie_embeddings:
        extra = [n for n in extra if n != "lm_head.weight"]
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} in all); the config "
                              "does not describe these weights")
    for name, meta in expected_shapes(cfg).items():  # biases the checkpoint leaves out of its layers are zero
        if name not in ours and name.endswith(".bias") and name.removesuffix("bias") + "weight" in ours:
            ours[name] = torch.zeros(meta.shape, dtype=next(iter(ours.values())).dtype)
    return cfg, ours


def read_hf_folder(src: str | Path) -> Converted:
    """An HF model folder (config.json + safetensors + tokenizer) -> Converted."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: no config.json (not a Hugging Face model folder)")
    hf_cfg = read_json(src / "config.json")
    kind = hf_cfg.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise CheckpointError(f"{src / 'config.json'}: unknown architecture model_type={kind!r} (llmkit imports: "
                              f"{', '.join(HF_MODEL_TYPES)})")
    tensors = read_safetensors_folder(src)
    files = list(src.glob("*.safetensors"))
    where = str(files[0]) if len(files) == 1 else f"{src} (config.json + shards)"  # name the file when there is one
    cfg, weights = hf_weights_to_llmkit(hf_cfg, tensors, where)
    tok = read_bert_tokenizer(src) if kind == "bert" else read_hf_tokenizer(src, hf_cfg)
    return Converted(cfg, weights, tok, {"format": "hf", "path": str(src.resolve())})


def read_bert_tokenizer(src: Path) -> Tokenizer:
    """A BERT folder's WordPiece tokenizer.json, with [CLS]/[SEP]/[PAD] as llmkit's special tokens."""
    from tokenizers import Tokenizer as HFTokenizer

    if not (src / "tokenizer.json").is_file():
        raise DataError(f"{src}: no tokenizer.json to go with the weights")
    try:
        tk = HFTokenizer.from_file(str(src / "tokenizer.json"))
    except Exception as e:
        raise DataError(f"{src / 'tokenizer.json'}: not a valid tokenizer ({str(e).splitlines()[0][:160]})") from None
    return wrap_bert_tokenizer(tk)


def write_hf_folder(conv: Converted, dst: str | Path) -> Path:
    """An HF folder that AutoModelForCausalLM (AutoModelForSeq2SeqLM for mbart) / AutoTokenizer load with no
    missing or unexpected weights:
    exact vocabulary (llmkit's padding rows dropped), config.json, generation_config.json, tokenizer files."""
    cfg, tok = conv.cfg, conv.tokenizer
    if cfg.arch == "gpt2" and (not cfg.bias or cfg.n_kv_head != cfg.n_head):
        raise CheckpointError("GPT-2 flavour without biases or with grouped-query attention has no transformers "
                              "equivalent (export needs model.bias=true and n_kv_head == n_head)")
    dst = Path(dst)
    check_replaceable(dst)
    hf = to_hf_state_dict(conv.weights, cfg)
    dtype = next(iter(hf.values())).dtype
    config = {**hf_config(cfg), "bos_token_id": tok.bos_id if tok.bos_id is not None else tok.eos_id,
              "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "dtype": str(dtype).removeprefix("torch.")}
    if cfg.arch == "bert":  # a sentence-embedding checkpoint has no pre-training heads: name what is there
        config["architectures"] = [bert_architecture(hf)]
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": end_of_turn_ids(tok),
                  "pad_token_id": tok.pad_id}
    if cfg.arch == "mbart":  # decoding starts from eos and stops at it; no hidden 20-token default cap
        hf.update(mbart_export_extras(cfg))
        config["decoder_start_token_id"] = decoder_start_id(tok)
        generation.update(decoder_start_token_id=decoder_start_id(tok), eos_token_id=tok.eos_id,
                          forced_eos_token_id=None, max_length=cfg.block_size)
    with atomic_dir(dst) as tmp:
        save_weights(hf, tmp / "model.safetensors", metadata={"format": "pt"})
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2))
        if cfg.arch != "bert":  # only text generators have generation settings
            atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=2))
        tok.save(tmp)
        if cfg.arch == "mbart":  # `tokenizer(text)` ends sources and labels with eos, as llmkit trained them
            atomic_write_text(tmp / "tokenizer.json", eos_appending(tok.tk, tok.eos_token, tok.eos_id).to_str())
    return dst


def bert_architecture(hf: dict[str, Tensor]) -> str:
    """The transformers class whose weights are exactly these: heads exported only where they exist."""
    mlm = any(k.startswith("cls.predictions.") for k in hf)
    nsp = any(k.startswith("cls.seq_relationship.") for k in hf)
    return "BertForPreTraining" if mlm and nsp else "BertForMaskedLM" if mlm else \
        "BertForNextSentencePrediction" if nsp else "BertModel"


