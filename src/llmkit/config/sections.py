"""Configs are data: dataclasses whose attribute docstrings are the `--help` text.

A run is described by one `RunConfig` with three sections (`model`, `data`, `train`). YAML recipes mirror it
key for key, the CLI overrides any key as `--section.key VALUE`, and every run folder keeps the resolved copy
(`config.yaml`). Unknown keys are errors, with a suggestion, because a silently ignored typo wastes a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
