"""Configs are data: dataclasses whose attribute docstrings are the `--help` text.

A run is described by one `RunConfig` with three sections (`model`, `data`, `train`). YAML recipes mirror it
key for key, the CLI overrides any key as `--section.key VALUE`, and every run folder keeps the resolved copy
(`config.yaml`). Unknown keys are errors, with a suggestion, because a silently ignored typo wastes a run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import ConfigError


def _require(ok: bool, key: str, value: Any, valid: str) -> None:
    """Raise `key: must be <valid>, got <value>` unless `ok`. Write `ok` as the valid condition (`x > 0`, not
    `not x <= 0`): NaN fails every comparison, so it is rejected too."""
    if not ok:
        raise ConfigError(f"{key}: must be {valid}, got {value!r}")


# Upper bounds on model sizes: far above any real checkpoint's, low enough that a typo (an extra 0 or three) is
# an error instead of an attempt to allocate terabytes.
MODEL_LIMITS: dict[str, int] = {"vocab_size": 1 << 24, "block_size": 1 << 22, "n_layer": 1024, "n_head": 1024,
                                "n_kv_head": 1024, "n_embd": 1 << 17, "intermediate_size": 1 << 19,
                                "pad_vocab_multiple": 4096, "type_vocab_size": 1024}


@dataclass
class ModelConfig:
    """Shape and flavour of a Transformer."""

    arch: str = "gpt2"
    """Flavour: `gpt2` (learned positions, LayerNorm, GELU, biases), `llama` (RoPE, RMSNorm, SwiGLU, GQA), `bert`
    (bidirectional encoder: learned positions + token types, post-LayerNorm, exact GELU, pooler, MLM/NSP heads) or
    `mbart` (encoder–decoder for text-to-text: mBART's pre-LayerNorm blocks, learned positions, exact GELU, the
    decoder cross-attending to the encoder); `lstm` is the recurrent baseline (embedding -> torch.nn.LSTM with
    n_layer layers of n_embd units -> tied head; attention keys unused)."""
    vocab_size: int = 50257
    """Tokens the tokenizer can produce; embeddings are padded up to `pad_vocab_multiple` for speed."""
    pad_vocab_multiple: int = 64
    """Round the embedding table up to a multiple of this (1 keeps it exact, as imported checkpoints need)."""
    block_size: int = 1024
    """Longest sequence the model is trained for (the context window)."""
    n_layer: int = 12
    """Number of Transformer blocks (an encoder–decoder's decoder blocks)."""
    n_encoder_layer: int | None = None
    """Encoder blocks of an encoder–decoder (mbart only); empty means as many as n_layer."""
    n_head: int = 12
    """Attention (query) heads per block."""
    n_kv_head: int | None = None
    """Key/value heads for grouped-query attention; empty means one per query head."""
    n_embd: int = 768
    """Width of the residual stream."""
    head_dim: int | None = None
    """Width of one attention head; empty means n_embd / n_head. Set when heads are narrower or wider than that
    (structured pruning removes whole heads and keeps their width; some checkpoints, e.g. Gemma, are built so)."""
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
    rope_scaling: dict | None = None
    """Rotary frequency scaling of a long-context checkpoint, as in HF's config (llama only): {rope_type: llama3,
    factor, low_freq_factor, high_freq_factor, original_max_position_embeddings} or {rope_type: linear, factor};
    empty means none."""
    autosize: bool = False
    """Set by preset `auto`: `llmkit pretrain` times a few shapes on this machine and trains the one that
    train.max_minutes makes compute-optimal (n_layer, n_head, n_kv_head, n_embd, intermediate_size; see
    train/autosize.py). The run's config.yaml keeps the chosen shape, autosize.json the measurements."""

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama", "bert", "mbart", "lstm"):
            raise ConfigError(f"model.arch: {self.arch!r} is not a known architecture (valid: gpt2, llama, bert, "
                              "mbart, lstm)")
        if self.arch == "mbart" and self.n_encoder_layer is None:
            self.n_encoder_layer = self.n_layer
        if self.n_encoder_layer is not None:
            _require(self.arch == "mbart", "model.n_encoder_layer", self.n_encoder_layer,
                     f"empty for arch {self.arch} (only an encoder–decoder, arch mbart, has encoder blocks)")
            _require(1 <= self.n_encoder_layer <= MODEL_LIMITS["n_layer"], "model.n_encoder_layer",
                     self.n_encoder_layer, f"a positive integer (at most {MODEL_LIMITS['n_layer']:,})")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            if self.arch in ("gpt2", "bert", "mbart"):
                self.intermediate_size = 4 * self.n_embd
            else:
                self.intermediate_size = 256 * ((int(8 * self.n_embd / 3) + 255) // 256)
        for name, limit in MODEL_LIMITS.items():
            _require(1 <= getattr(self, name) <= limit, f"model.{name}", getattr(self, name),
                     f"a positive integer (at most {limit:,})")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ConfigError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}) "
                                  "unless model.head_dim is set")
            self.head_dim = self.n_embd // self.n_head
        _require(1 <= self.head_dim <= 1 << 14, "model.head_dim", self.head_dim, "a positive integer (at most 16,384)")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if self.arch == "llama" and self.head_dim % 2:
            raise ConfigError(f"model.head_dim = {self.head_dim}: rotary positions (llama) need an even head "
                              "dimension")
        _require(0 < self.norm_eps < 1, "model.norm_eps", self.norm_eps, "a small positive number (e.g. 1e-5)")
        _require(0 < self.rope_theta < math.inf, "model.rope_theta", self.rope_theta, "a positive number")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m


ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _check_rope_scaling(rs: Any) -> None:
    """model.rope_scaling names a scaling `model/layers.Rotary` implements, with every number it needs."""
    kind = rs.get("rope_type") if isinstance(rs, dict) else None
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"model.rope_scaling: rope_type {kind!r} is not supported (valid: "
                          f"{', '.join(ROPE_SCALING_KEYS)})")
    for key in ROPE_SCALING_KEYS[kind]:
        if not isinstance(rs.get(key), (int, float)) or isinstance(rs.get(key), bool) or rs[key] <= 0:
            raise ConfigError(f"model.rope_scaling: rope_type {kind} needs a positive number {key}, got "
                              f"{rs.get(key)!r}")


# What preset `auto` decides itself: setting one of them beside it is an error, not silently overridden.
AUTO_SIZED = ("n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "intermediate_size")
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The demo: small enough to train well in minutes on a 2-core laptop CPU.
    "tiny": dict(arch="llama", n_layer=6, n_head=6, n_kv_head=6, n_embd=384, block_size=256, bias=False,
                 tie_embeddings=True, intermediate_size=1024, dropout=0.0),
    # The shape a time budget makes compute-optimal here (train/autosize.py): the tiny flavour, sized by pretrain.
    "auto": dict(arch="llama", block_size=256, bias=False, tie_embeddings=True, dropout=0.0, autosize=True),
    "gpt2-124m": dict(arch="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-350m": dict(arch="gpt2", n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    # The shape of HuggingFaceTB/SmolLM2-135M(-Instruct).
    "smollm2-135m": dict(arch="llama", n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                         block_size=8192, vocab_size=49152, bias=False, tie_embeddings=True, norm_eps=1e-5,
                         rope_theta=100000.0, pad_vocab_multiple=1),
    # A ~19 M student of SmolLM2 (its 49,152-token tokenizer, tied embeddings): `llmkit distill`'s draft model,
    # small enough that a drafted token costs a small fraction of the teacher's.
    "smollm2-draft": dict(arch="llama", n_layer=8, n_head=4, n_kv_head=2, n_embd=256, intermediate_size=768,
                          block_size=512, vocab_size=49152, bias=False, tie_embeddings=True, norm_eps=1e-5,
                          rope_theta=100000.0, dropout=0.0),
    # A small BERT for masked-LM pretraining from scratch on a CPU (configs/mlm-shakespeare.yaml).
    "bert-mini": dict(arch="bert", n_layer=4, n_head=4, n_embd=256, intermediate_size=1024, block_size=128,
                      norm_eps=1e-12, dropout=0.1, type_vocab_size=2),
    # The shape of sentence-transformers/all-MiniLM-L6-v2 (weights: the built-in model `all-minilm-l6-v2`).
    "minilm-l6": dict(arch="bert", n_layer=6, n_head=12, n_embd=384, intermediate_size=1536, block_size=512,
                      vocab_size=30522, norm_eps=1e-12, pad_vocab_multiple=1, type_vocab_size=2),
    # Encoder–decoders (text-to-text; vocab_size is the tokenizer's). seq2seq-tiny (~1.2 M at 2,048 tokens) learns
    # in about a minute on a 2-core CPU (tests use it). seq2seq-small (~21 M at 8,192 tokens) is the KJV -> WEB
    # model, JoeyNMT-sized: a deep encoder and a shallow decoder (Kasai et al. 2021: about the quality of a
    # balanced split, and decoding, token by token, runs only 3 blocks).
    "seq2seq-tiny": dict(arch="mbart", n_encoder_layer=2, n_layer=2, n_head=4, n_embd=128, intermediate_size=512,
                         block_size=128, vocab_size=2048, dropout=0.0),
    "seq2seq-small": dict(arch="mbart", n_encoder_layer=6, n_layer=3, n_head=6, n_embd=384, intermediate_size=1536,
                          block_size=256, vocab_size=8192, dropout=0.1),
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

    def __post_init__(self) -> None:
        _require(1 <= self.batch_size <= 1 << 20, "data.batch_size", self.batch_size,
                 "a positive integer (at most 1,048,576)")
        _require(bool(str(self.path).strip()), "data.path", self.path, "a folder, file or built-in name")


# The validation figures each objective produces (train/objectives.py; causal_lm's perplexity and bits per byte
# come from train/pretrain.py): what train.select_metric may name, checked when the config is built.
OBJECTIVE_METRICS: dict[str, tuple[str, ...]] = {
    "causal_lm": ("val_loss", "val_perplexity", "val_bits_per_byte"),
    "mlm": ("val_loss", "val_masked_accuracy"),
    "mlm+nsp": ("val_loss", "val_masked_accuracy", "val_mlm_loss", "val_nsp_loss", "val_nsp_accuracy"),
    "classify": ("val_loss", "val_accuracy"),
    "seq2seq": ("val_loss",),
}
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


@dataclass
class TrainConfig:
    """The one training loop: optimiser, schedule, precision, evaluation, checkpoints."""

    objective: str = "causal_lm"
    """What the model learns: `causal_lm` (next-token prediction), `mlm` (masked LM, bert), `mlm+nsp` (masked LM +
    next-sentence prediction, bert), `classify` (sequence classification, set by `llmkit finetune`) or `seq2seq`
    (an encoder–decoder's teacher-forced cross-entropy, set by `llmkit finetune --task text2text`)."""
    max_steps: int = 2000
    """Optimiser steps to run; also the length of the cosine schedule."""
    max_minutes: float = 0.0
    """Training time budget (0 = none): after the first few steps rank 0 times a step, an evaluation and a
    checkpoint and fixes how many steps fit (at most max_steps); the cosine schedule, the progress bar and the end
    follow that plan, which checkpoints keep, and the final evaluation and checkpoint still fit."""
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
    """Compute precision: `float32`, `bfloat16` (autocast), `float16` (autocast + loss scaling) or `auto` (bf16
    where the hardware does it fast)."""
    tf32: bool = False
    """On CUDA, run float32 matmuls as TF32 (faster, 10-bit mantissa) for this run only; off = true fp32."""
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
    report_to: list[str] = field(default_factory=lambda: ["none"])
    """Where the logged figures also go, besides metrics.jsonl: `none` or `tensorboard` (event files in
    <run>/tensorboard/; needs `pip install 'llmkit[tensorboard]'`)."""
    seed: int = 1337
    """Seed for weight initialisation and dropout."""
    threads: int = 0
    """CPU threads for PyTorch (0 = leave PyTorch's default)."""
    strategy: str = "auto"
    """Several processes (torchrun): `ddp` (a whole model per process), `fsdp` (each process holds 1/N of the
    weights, gradients and optimizer state: models larger than one device) or `auto` (ddp)."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVE_METRICS:
            raise ConfigError(f"train.objective: unknown objective {self.objective!r} "
                              f"(valid: {', '.join(OBJECTIVE_METRICS)})")
        measured = OBJECTIVE_METRICS[self.objective]
        if self.select_metric not in measured:
            raise ConfigError(f"train.select_metric: {self.select_metric!r} is not measured by objective "
                              f"{self.objective} (valid: {', '.join(measured)})")
        for name in ("max_steps", "grad_accum", "eval_iters", "log_interval"):
            _require(1 <= getattr(self, name) < 1 << 62, f"train.{name}", getattr(self, name), "a positive integer")
        for name in ("warmup_steps", "eval_interval", "early_stop_patience", "save_interval", "threads"):
            _require(0 <= getattr(self, name) < 1 << 62, f"train.{name}", getattr(self, name),
                     "a non-negative integer")
        _require(0 <= self.lr < math.inf, "train.lr", self.lr, "a finite number >= 0 (0 freezes the weights)")
        _require(0 <= self.max_minutes < math.inf, "train.max_minutes", self.max_minutes, "0 (no limit) or more")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        _require(0 <= self.weight_decay < math.inf, "train.weight_decay", self.weight_decay, "0 or more")
        _require(0 <= self.beta1 < 1, "train.beta1", self.beta1, "in [0, 1)")
        _require(0 <= self.beta2 < 1, "train.beta2", self.beta2, "in [0, 1)")
        _require(0 <= self.grad_clip < math.inf, "train.grad_clip", self.grad_clip, "0 (off) or more")
        _require(self.dtype in DTYPES, "train.dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "train.device", self.device,
                 "auto, cpu, cuda or cuda:N")
        _require(self.strategy in ("auto", "ddp", "fsdp"), "train.strategy", self.strategy, "auto, ddp or fsdp")
        _require(set(self.report_to) <= {"none", "tensorboard"}, "train.report_to", self.report_to,
                 "none or tensorboard")


# finetune.augment's edits (data/augment.py applies them); named here so a config is checked where it is built.
AUGMENTATIONS = ("word_dropout", "word_swap")


@dataclass
class FinetuneConfig:
    """What `llmkit finetune` adapts a pretrained model to (unused by `llmkit pretrain`)."""

    task: str = "classify"
    """`classify`: one label per text (sentiment, topic, ...); `text2text`: an encoder–decoder learns source ->
    target pairs; `sft`: a decoder learns to answer an instruction + source with the target (chat template)."""
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
    dropout: float | None = None
    """classify: dropout inside the backbone while fine-tuning (embeddings, attention weights, residual branches),
    a regulariser against memorising the training domain; empty keeps the backbone's own (the built-in models
    are converted for inference, with none)."""
    augment: list[str] = field(default_factory=list)
    """classify: random edits to each training text, drawn afresh (seeded by data.seed) every time a batch takes
    it; validation and test texts are never edited. `word_dropout` deletes each word with probability augment_p,
    `word_swap` swaps a word with its right neighbour with probability augment_p; empty = none."""
    augment_p: float = 0.1
    """Per-word probability of each augmentation in finetune.augment, in (0, 0.5]."""
    mix: list[str] = field(default_factory=list)
    """classify: more labelled data from domains you have (built-in `vader-amazon`, or CSV/TSV/JSONL files with
    the same text/label fields), each cut by the same fixed 80/10/10 split: its training and validation parts join
    the main data's (shuffled together; max_train/val_examples then apply), its test part is scored separately
    into eval.json (`mix`). The test-only sets (vader-nyt, vader-tweets) are refused."""
    source_field: str = "source"
    """text2text / sft pair files: key (JSONL) or column (TSV) holding the source text."""
    target_field: str = "target"
    """text2text / sft pair files: key (JSONL) or column (TSV) holding the target text."""
    instruction: str = "Rewrite this verse in modern English:"
    """sft: the user turn is this instruction, a blank line, then the source; the assistant turn is the target."""
    label_smoothing: float = 0.1
    """text2text: share of the target probability spread over the whole vocabulary while training (validation
    loss is always the plain cross-entropy)."""
    tokenizer: str = ""
    """text2text from a preset: '' trains a byte-level BPE on both sides of the training pairs; or a tokenizer
    folder, or `gpt2` (the GPT-2 vocabulary). A run folder as --model always keeps its own tokenizer."""
    tokenizer_vocab_size: int = 8000
    """text2text from a preset: vocabulary size of the BPE trained on the pairs."""

    def __post_init__(self) -> None:
        if self.task not in ("classify", "text2text", "sft"):
            raise ConfigError(f"finetune.task: unknown task {self.task!r} (valid: classify, text2text, sft)")
        if self.pooling not in ("auto", "cls", "mean", "last"):
            raise ConfigError(f"finetune.pooling: {self.pooling!r} is not one of auto, cls, mean, last")
        _require(4 <= self.max_length <= 1 << 22, "finetune.max_length", self.max_length, "an integer of 4 or more")
        _require(1 <= self.lora_r <= 1 << 16, "finetune.lora_r", self.lora_r, "a positive integer")
        _require(0 <= self.epochs < 1e6, "finetune.epochs", self.epochs, "0 (use train.max_steps) or more")
        for name in ("max_train_examples", "max_val_examples"):
            _require(0 <= getattr(self, name) < 1 << 62, f"finetune.{name}", getattr(self, name), "0 (all) or more")
        _require(0 < self.lora_alpha < math.inf, "finetune.lora_alpha", self.lora_alpha, "a positive number")
        _require(0 <= self.lora_dropout < 1, "finetune.lora_dropout", self.lora_dropout, "in [0, 1)")
        _require(0 <= self.label_smoothing < 1, "finetune.label_smoothing", self.label_smoothing, "in [0, 1)")
        _require(259 <= self.tokenizer_vocab_size <= 1 << 20, "finetune.tokenizer_vocab_size",
                 self.tokenizer_vocab_size, "an integer from 259 (bytes + specials) up")
        for name in ("text_field", "label_field", "source_field", "target_field"):
            _require(bool(getattr(self, name)), f"finetune.{name}", getattr(self, name), "a column or key name")
        _require(len(set(self.labels)) == len(self.labels), "finetune.labels", self.labels, "distinct names")
        self._check_generalisation()

    def _check_generalisation(self) -> None:
        """The classify-only remedies (dropout, augmentation, domain mixing): one-line errors for bad values."""
        used = [k for k, on in (("dropout", self.dropout is not None), ("augment", self.augment),
                                ("mix", self.mix)) if on]
        if used and self.task != "classify":
            raise ConfigError(f"finetune.{used[0]}: applies to --task classify only, not {self.task}")
        if self.dropout is not None:
            _require(0 <= self.dropout < 1, "finetune.dropout", self.dropout, "in [0, 1) (or empty: the model's own)")
        for op in self.augment:
            _require(op in AUGMENTATIONS, "finetune.augment", op, f"one of {', '.join(AUGMENTATIONS)}")
        _require(len(set(self.augment)) == len(self.augment), "finetune.augment", self.augment, "distinct names")
        _require(0 < self.augment_p <= 0.5, "finetune.augment_p", self.augment_p, "in (0, 0.5]")
        _require(all(str(m).strip() for m in self.mix) and len(set(self.mix)) == len(self.mix), "finetune.mix",
                 self.mix, "distinct dataset names or files")


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
