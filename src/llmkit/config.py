"""Configs are data: dataclasses whose attribute docstrings are the `--help` text.

A run is described by one `RunConfig` with three sections (`model`, `data`, `train`). YAML recipes mirror it
key for key, the CLI overrides any key as `--section.key VALUE`, and every run folder keeps the resolved copy
(`config.yaml`). Unknown keys are errors, with a suggestion, because a silently ignored typo wastes a run.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from llmkit.errors import ConfigError


@dataclass
class ModelConfig:
    """Shape and flavour of a Transformer."""

    arch: str = "gpt2"
    """Flavour: `gpt2` (learned positions, LayerNorm, GELU, biases), `llama` (RoPE, RMSNorm, SwiGLU, GQA) or `bert`
    (bidirectional encoder: learned positions + token types, post-LayerNorm, exact GELU, pooler, MLM/NSP heads)."""
    vocab_size: int = 50257
    """Tokens the tokenizer can produce; embeddings are padded up to `pad_vocab_multiple` for speed."""
    pad_vocab_multiple: int = 64
    """Round the embedding table up to a multiple of this (1 keeps it exact, as imported checkpoints need)."""
    block_size: int = 1024
    """Longest sequence the model is trained for (the context window)."""
    n_layer: int = 12
    """Number of Transformer blocks."""
    n_head: int = 12
    """Attention (query) heads per block."""
    n_kv_head: int | None = None
    """Key/value heads for grouped-query attention; empty means one per query head."""
    n_embd: int = 768
    """Width of the residual stream."""
    intermediate_size: int | None = None
    """Hidden width of the MLP; empty means 4 x n_embd (gpt2) or the Llama rule 8/3 x n_embd rounded to 256."""
    bias: bool = True
    """Biases in linear layers and LayerNorm (GPT-2 has them, Llama does not)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary position frequencies (llama flavour)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches while training."""
    type_vocab_size: int = 2
    """Token-type (segment) embeddings, BERT's sentence A / sentence B (bert only)."""

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama", "bert"):
            raise ConfigError(f"model.arch: {self.arch!r} is not a known architecture (valid: gpt2, llama, bert)")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            if self.arch in ("gpt2", "bert"):
                self.intermediate_size = 4 * self.n_embd
            else:
                self.intermediate_size = 256 * ((int(8 * self.n_embd / 3) + 255) // 256)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pad_vocab_multiple",
                     "type_vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}: must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The demo: small enough to train well in minutes on a 2-core laptop CPU.
    "tiny": dict(arch="llama", n_layer=6, n_head=6, n_kv_head=6, n_embd=384, block_size=256, bias=False,
                 tie_embeddings=True, intermediate_size=1024, dropout=0.0),
    "gpt2-124m": dict(arch="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-350m": dict(arch="gpt2", n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    # The shape of HuggingFaceTB/SmolLM2-135M(-Instruct).
    "smollm2-135m": dict(arch="llama", n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                         block_size=8192, vocab_size=49152, bias=False, tie_embeddings=True, norm_eps=1e-5,
                         rope_theta=100000.0, pad_vocab_multiple=1),
    # A small BERT for masked-LM pretraining from scratch on a CPU (configs/mlm-shakespeare.yaml).
    "bert-mini": dict(arch="bert", n_layer=4, n_head=4, n_embd=256, intermediate_size=1024, block_size=128,
                      norm_eps=1e-12, dropout=0.1, type_vocab_size=2),
    # The shape of sentence-transformers/all-MiniLM-L6-v2 (weights: the built-in model `all-minilm-l6-v2`).
    "minilm-l6": dict(arch="bert", n_layer=6, n_head=12, n_embd=384, intermediate_size=1536, block_size=512,
                      vocab_size=30522, norm_eps=1e-12, pad_vocab_multiple=1, type_vocab_size=2),
}


@dataclass
class DataConfig:
    """Where the token shards are and how batches are cut from them."""

    path: str = "data/shakespeare"
    """Folder written by `llmkit prepare` (train.bin, val.bin, meta.json, tokenizer/)."""
    batch_size: int = 16
    """Sequences per micro-batch (per process)."""
    seed: int = 1337
    """Seed of the batch order; the same seed gives the same batches in the same order."""


@dataclass
class TrainConfig:
    """The one training loop: optimiser, schedule, precision, evaluation, checkpoints."""

    objective: str = "causal_lm"
    """What the model learns: `causal_lm` (next-token prediction), `mlm` (masked LM, bert), `mlm+nsp` (masked LM +
    next-sentence prediction, bert) or `classify` (sequence classification, set by `llmkit finetune`)."""
    max_steps: int = 2000
    """Optimiser steps to run; also the length of the cosine schedule."""
    max_minutes: float = 0.0
    """Stop after this much training time (0 = no limit); the cosine schedule then decays by time or steps,
    whichever runs out first, and the final evaluation and checkpoint still run."""
    lr: float = 1e-3
    """Peak learning rate, reached after warmup."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr x this at max_steps."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many steps."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (never on norms, biases or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step."""
    dtype: str = "auto"
    """Compute precision: `float32`, `bfloat16` (autocast) or `auto` (bf16 where the hardware does it fast)."""
    device: str = "auto"
    """`cpu`, `cuda` or `auto` (cuda when available)."""
    compile: bool = False
    """Compile the model with torch.compile (slower start, faster steps)."""
    eval_interval: int = 200
    """Evaluate on the validation split every this many steps (0 = only at the end)."""
    eval_iters: int = 20
    """Validation batches per evaluation."""
    early_stop_patience: int = 0
    """Stop when the selection metric has not improved for this many evaluations (0 = never)."""
    select_metric: str = "val_loss"
    """Validation figure that picks the best weights (model.safetensors) and drives early stopping: losses,
    perplexity and bits per byte are minimised, anything else (e.g. `val_accuracy`) is maximised."""
    save_interval: int = 0
    """Write a resumable checkpoint every this many steps (0 = at evaluations and at the end)."""
    log_interval: int = 10
    """Write a line to metrics.jsonl every this many steps."""
    seed: int = 1337
    """Seed for weight initialisation and dropout."""
    threads: int = 0
    """CPU threads for PyTorch (0 = leave PyTorch's default)."""


@dataclass
class FinetuneConfig:
    """What `llmkit finetune` adapts a pretrained model to (unused by `llmkit pretrain`)."""

    task: str = "classify"
    """`classify`: one label per text (sentiment, topic, ...)."""
    base: str = ""
    """The starting model: a built-in name (e.g. `all-minilm-l6-v2`), an HF folder or an llmkit run folder."""
    labels: list[str] = field(default_factory=list)
    """Class names in id order; empty = the labels of the training split, sorted."""
    text_field: str = "text"
    """Column (CSV/TSV) or key (JSONL) holding the text."""
    label_field: str = "label"
    """Column (CSV/TSV) or key (JSONL) holding the label."""
    max_length: int = 128
    """Longest input in tokens, special tokens included; longer texts keep their start."""
    pooling: str = "auto"
    """Text -> one vector: `cls` (BERT pooler on [CLS]), `mean` (mean of token states), `last` (last real token,
    the decoder way) or `auto` (mean for encoders, last for decoders)."""
    epochs: float = 3.0
    """Passes over the training split; sets train.max_steps (0 = keep train.max_steps)."""
    max_train_examples: int = 0
    """Train on the first N examples of the (shuffled) training split only (0 = all): big models in CPU minutes."""
    max_val_examples: int = 0
    """Validate on the first N examples of the validation split only (0 = all)."""
    lora: bool = False
    """Train low-rank adapters (peft LoRA) plus the new head instead of every weight."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc"])
    """Module names that get adapters (`qkv`, `proj` = attention and MLP output, `fc` = MLP input)."""

    def __post_init__(self) -> None:
        if self.task not in ("classify",):
            raise ConfigError(f"finetune.task: unknown task {self.task!r} (valid: classify)")
        if self.pooling not in ("auto", "cls", "mean", "last"):
            raise ConfigError(f"finetune.pooling: {self.pooling!r} is not one of auto, cls, mean, last")
        if self.max_length < 4:
            raise ConfigError(f"finetune.max_length: must be at least 4, got {self.max_length}")
        if self.lora_r < 1:
            raise ConfigError(f"finetune.lora_r: must be a positive integer, got {self.lora_r}")


@dataclass
class RunConfig:
    """Everything a pretraining run needs; saved as config.yaml in the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class FinetuneRunConfig(RunConfig):
    """A fine-tuning run: a pretraining run's sections plus what the model is adapted to."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# --------------------------------------------------------------------------------------------- docs and types


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field), read from its source,
    inherited fields included."""
    docs: dict[str, str] = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        if base is not cls:
            docs.update(field_docs(base))
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name) and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())  # one line, however it was wrapped
    return docs


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn a YAML/CLI value into the field's declared type, or raise a one-line error naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return coerce(value, args[0], where)
    if origin is list:  # YAML gives a list; the CLI gives `a,b,c`
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, typing.get_args(tp)[0], where) for v in value] if typing.get_args(tp) else list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(valid)})"
    return ConfigError(f"unknown config key {where + key!r}{hint}")


def build(cls: type, values: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, recursing into nested sections; unknown keys are errors."""
    values = dict(values or {})
    if cls is ModelConfig and "preset" in values:
        values = {**model_preset(values.pop("preset")), **values}
    names = [f.name for f in fields(cls)]
    for key in values:
        if key not in names:
            raise _unknown(key, names, where)
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        tp = _field_type(cls, f.name)
        if dataclasses.is_dataclass(tp):
            sub = values[f.name]
            if isinstance(sub, str) and tp is ModelConfig:
                sub = {"preset": sub}
            if not isinstance(sub, dict):
                raise ConfigError(f"{where}{f.name}: expected a mapping of keys, got {sub!r}")
            kwargs[f.name] = build(tp, sub, f"{where}{f.name}.")
        else:
            kwargs[f.name] = coerce(values[f.name], tp, f"{where}{f.name}")
    return cls(**kwargs)


def model_preset(name: str) -> dict[str, Any]:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r} (valid: {', '.join(MODEL_PRESETS)})")
    return dict(MODEL_PRESETS[name])


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config sections at the top level")
    return data


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge dotted overrides (`train.lr` -> 3e-4) into a nested mapping; validation happens in `build`."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.get(part)
            if isinstance(nxt, str) and part == "model":  # `model: tiny` shorthand
                nxt = {"preset": nxt}
            if not isinstance(nxt, dict):
                nxt = {}
            node[part] = nxt
            node = nxt
        node[parts[-1]] = value
    return out


def parse_override_args(args: list[str]) -> dict[str, str]:
    """`--train.lr 3e-4 --model.n_layer=4` -> {"train.lr": "3e-4", "model.n_layer": "4"}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"unexpected argument {arg!r} (config overrides look like --train.lr 3e-4)")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg}: missing a value")
            value = args[i + 1]
            i += 1
        out[key.replace("-", "_")] = value
        i += 1
    return out


def load_run_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    values = load_yaml(path) if path else {}
    return build(RunConfig, apply_overrides(values, overrides or {}))


def read_run_folder_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run folder was written with: a FinetuneRunConfig when it has a finetune section."""
    from llmkit.errors import CheckpointError

    cfg_file = Path(run_dir) / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"{run_dir}: no config.yaml (not an llmkit run folder)")
    values = load_yaml(cfg_file)
    return build(FinetuneRunConfig if "finetune" in values else RunConfig, values)


def save_yaml(cfg: Any, path: str | Path) -> None:
    from llmkit.checkpoint import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def help_text(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """One line per config key with its default and docstring, for `--help`."""
    lines: list[str] = []
    docs = field_docs(cls)
    for f in fields(cls):
        tp = _field_type(cls, f.name)
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{f.name}: {(tp.__doc__ or '').strip()}")
            lines.extend(help_text(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        lines.append(f"  --{prefix}{f.name} (default: {default}) {docs.get(f.name, '')}")
    return lines
