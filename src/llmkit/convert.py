"""`llmkit convert`: Hugging Face folders and GGUF files in, llmkit run folders or Hugging Face folders out.

Every conversion goes through one in-memory form, `Converted` (a ModelConfig, llmkit-named weights and a
Tokenizer), and every rename goes through the tables in `hf.py`:

    HF folder  --read_hf_folder-->   Converted  --write_run_folder-->  llmkit run folder
    GGUF file  --gguf_import------>  Converted  --write_hf_folder--->  HF folder transformers loads
    run folder --read_run_folder-->  Converted

Only safetensors are read (never pickled `.bin` files), so a checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmkit.checkpoint import atomic_write_text, load_weights, save_weights
from llmkit.config import ModelConfig, RunConfig, read_run_folder_config, save_yaml
from llmkit.errors import CheckpointError, DataError, LLMKitError
from llmkit.hf import _rows, from_hf_state_dict, hf_config, model_config_from_hf, to_hf_state_dict
from llmkit.model import DecoderLM, build_model
from llmkit.tokenizer import Tokenizer

# HF tensors that are buffers rebuilt from the config, not weights: safe to ignore on import.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# Tokens that end an assistant turn in common chat templates; generation stops at any the vocabulary has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


@dataclass
class Converted:
    """A model in memory between formats: llmkit config + llmkit-named weights + tokenizer."""

    cfg: ModelConfig
    weights: dict[str, Tensor]
    tokenizer: Tokenizer
    source: dict[str, Any] = field(default_factory=dict)  # where it came from, written to source.json


# --------------------------------------------------------------------------------------------- model building


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Make torch.nn.init a no-op while a model is built whose weights are loaded right after (135 M random
    normals cost ~2 s on a laptop CPU, the load that overwrites them ~0.2 s). `load_into` checks that every
    tensor is then loaded, so no uninitialised memory survives."""
    names = ("normal_", "zeros_", "ones_", "uniform_", "kaiming_uniform_", "trunc_normal_", "constant_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def empty_model(cfg: ModelConfig) -> DecoderLM:
    """A model of this shape with uninitialised weights, for loading a checkpoint into."""
    with _skip_init():
        return build_model(cfg)


def expected_shapes(cfg: ModelConfig) -> dict[str, Tensor]:
    """The state dict a model of this shape saves (tied head left out), as free meta tensors."""
    with torch.device("meta"):
        own = build_model(cfg).state_dict()
    if cfg.tie_embeddings:
        own.pop("lm_head.weight", None)
    return own


# --------------------------------------------------------------------------------------------- reading


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


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
    return Tokenizer(tk, eos_token=eos, pad_token=token("pad_token"), bos_token=token("bos_token"),
                     chat_template=template, kind="bpe")


def hf_weights_to_llmkit(hf_cfg: dict[str, Any], hf: dict[str, Tensor], where: str) -> tuple[ModelConfig, dict]:
    """Config + HF-named tensors -> llmkit config + weights, with one-line errors prefixed by `where`."""
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
    for name, meta in expected_shapes(cfg).items():  # biases the checkpoint leaves out are zero
        if name not in ours and name.endswith(".bias"):
            ours[name] = torch.zeros(meta.shape, dtype=next(iter(ours.values())).dtype)
    return cfg, ours


def read_hf_folder(src: str | Path) -> Converted:
    """An HF model folder (config.json + safetensors + tokenizer) -> Converted."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: no config.json (not a Hugging Face model folder)")
    hf_cfg = read_json(src / "config.json")
    if hf_cfg.get("model_type") == "bert":
        raise CheckpointError(f"{src}: a BERT encoder, not a text generator (decoders: gpt2, llama); encoders "
                              "serve `llmkit embed` and `llmkit finetune`")
    if hf_cfg.get("model_type") not in ("gpt2", "llama", "mistral", "qwen2"):
        raise CheckpointError(f"{src / 'config.json'}: unknown architecture model_type="
                              f"{hf_cfg.get('model_type')!r} (llmkit imports: gpt2, llama)")
    tensors = read_safetensors_folder(src)
    files = list(src.glob("*.safetensors"))
    where = str(files[0]) if len(files) == 1 else f"{src} (config.json + shards)"  # name the file when there is one
    cfg, weights = hf_weights_to_llmkit(hf_cfg, tensors, where)
    return Converted(cfg, weights, read_hf_tokenizer(src, hf_cfg), {"format": "hf", "path": str(src.resolve())})


def read_run_folder(src: str | Path) -> Converted:
    src = Path(src)
    cfg = read_run_folder_config(src).model
    return Converted(cfg, load_weights(src / "model.safetensors"), Tokenizer.load(src / "tokenizer"),
                     {"format": "llmkit", "path": str(src.resolve())})


def read_any(src: str | Path) -> Converted:
    """Run folder, HF folder, `.gguf` file or built-in model name -> Converted."""
    p = Path(src)
    if p.is_file() and p.suffix == ".gguf":
        from llmkit.gguf_import import read_gguf

        return read_gguf(p)
    if p.is_dir():
        if (p / "config.yaml").is_file():
            return read_run_folder(p)
        return read_hf_folder(p)
    if p.exists():
        raise CheckpointError(f"{p}: not a model (give a run folder, a Hugging Face folder or a .gguf file)")
    from llmkit.registry import locate

    return read_any(locate(str(src)))  # a built-in name: its HF folder, or the cached conversion of its GGUF


# --------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_dir(dst: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `dst` in one rename, so readers never see a
    half-written model (and a failed conversion leaves the old one in place)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the finished folder gets normal permissions
    try:
        yield tmp
        old = None
        if dst.exists():
            old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old."))
            os.replace(dst, old / "x")
        os.replace(tmp, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_run_folder(conv: Converted, dst: str | Path, dtype: torch.dtype | None = None) -> Path:
    """config.yaml (model section) + model.safetensors + tokenizer/ + source.json, written atomically."""
    dst = Path(dst)
    weights = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in conv.weights.items()}
    with atomic_dir(dst) as tmp:
        save_yaml(RunConfig(model=conv.cfg), tmp / "config.yaml")
        save_weights(weights, tmp / "model.safetensors")
        conv.tokenizer.save(tmp / "tokenizer")
        atomic_write_text(tmp / "source.json", json.dumps(conv.source, indent=2))
    return dst


def end_of_turn_ids(tok: Tokenizer) -> list[int]:
    """eos plus every end-of-turn token the vocabulary has: generation stops at any of them."""
    ids = [tok.eos_id] + [tok.token_to_id(t) for t in END_OF_TURN_TOKENS]
    return sorted({i for i in ids if i is not None})


def write_hf_folder(conv: Converted, dst: str | Path) -> Path:
    """An HF folder that AutoModelForCausalLM / AutoTokenizer load with no missing or unexpected weights:
    exact vocabulary (llmkit's padding rows dropped), config.json, generation_config.json, tokenizer files."""
    cfg, tok = conv.cfg, conv.tokenizer
    if cfg.arch == "gpt2" and (not cfg.bias or cfg.n_kv_head != cfg.n_head):
        raise CheckpointError("GPT-2 flavour without biases or with grouped-query attention has no transformers "
                              "equivalent (export needs model.bias=true and n_kv_head == n_head)")
    hf = to_hf_state_dict(conv.weights, cfg)
    dtype = next(iter(hf.values())).dtype
    config = {**hf_config(cfg), "bos_token_id": tok.bos_id if tok.bos_id is not None else tok.eos_id,
              "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "dtype": str(dtype).removeprefix("torch.")}
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": end_of_turn_ids(tok),
                  "pad_token_id": tok.pad_id}
    dst = Path(dst)
    with atomic_dir(dst) as tmp:
        save_weights(hf, tmp / "model.safetensors", metadata={"format": "pt"})
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2))
        atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=2))
        tok.save(tmp)
    return dst


def convert(src: str | Path, dst: str | Path, to: str, dtype: str | None = None) -> Path:
    """The `llmkit convert` verb: anything readable -> an llmkit run folder (`to="llmkit"`) or HF folder."""
    if to not in ("llmkit", "hf"):
        raise CheckpointError(f"--to {to!r}: valid targets are llmkit and hf")
    conv = read_any(src)
    if dtype:
        from llmkit.train import resolve_dtype

        conv.weights = {k: v.to(resolve_dtype(dtype, torch.device("cpu"))) for k, v in conv.weights.items()}
    return write_run_folder(conv, dst) if to == "llmkit" else write_hf_folder(conv, dst)
