"""`llmkit finetune --task text2text`: train an encoder–decoder on source -> target pairs, in the one loop.

From a preset (e.g. `seq2seq-tiny`) the model starts from scratch with a tokenizer made for the pairs: a byte-level
BPE trained on both sides of the training split (one vocabulary for encoder and decoder, so a word copied from
the source is the same token in the target; `finetune.tokenizer` may name an existing one instead). From a run
folder it continues from that run's weights and keeps its tokenizer. The run folder is what every verb loads:
config.yaml (train.objective `seq2seq`), tokenizer/, model.safetensors (best validation loss), checkpoints/
(resumable), metrics.jsonl, loss.png. Score it with `llmkit eval --task text2text`.

"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from llmkit.config import MODEL_PRESETS, FinetuneRunConfig
from llmkit.data.pairs import Pair
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import ConfigError
from llmkit.infer.load import load_model
from llmkit.model import build_model
from llmkit.model.seq2seq import source_ids, target_ids
from llmkit.tasks.pair_tasks import keep_fitting, pair_splits, start_pair_run, steps_for, summary
from llmkit.train.loop import Callback, train
from llmkit.train.objectives import Seq2Seq


def pair_tokenizer(cfg: FinetuneRunConfig, train_pairs: list[Pair], out: Path, resume: bool,
                   quiet: bool) -> Tokenizer:
    """The tokenizer of a from-scratch encoder–decoder: the run's own on resume, a named one, or a BPE trained on
    both sides of the training pairs (encoder and decoder share it)."""
    ft = cfg.finetune
    if resume:
        return Tokenizer.load(out / "tokenizer")
    if ft.tokenizer:
        return Tokenizer.load(ft.tokenizer)
    if not quiet:
        print(f"training a {ft.tokenizer_vocab_size:,}-token BPE on both sides of {len(train_pairs):,} pairs",
              file=sys.stderr)
    texts = [t for p in train_pairs for t in (p.source, p.target)]
    return Tokenizer.train_bpe(texts, ft.tokenizer_vocab_size, length=len(texts), progress=not quiet)


def text2text(cfg: FinetuneRunConfig, out_dir: str | Path, resume: bool = False, quiet: bool = False,
              overwrite: bool = False, callbacks: tuple[Callback, ...] = ()) -> dict[str, Any]:
    """Train an encoder–decoder on cfg.data.path's pairs into `out_dir`; returns the summary. Every check happens
    before the first write. `callbacks` see every logged step (as in `pretrain`)."""
    ft, out = cfg.finetune, Path(out_dir)
    splits = pair_splits(cfg)
    base_is_run = Path(ft.base).is_dir()
    if not base_is_run and ft.base not in MODEL_PRESETS:
        raise ConfigError(f"--model {ft.base!r}: neither a run folder nor a model preset (presets: "
                          f"{', '.join(MODEL_PRESETS)})")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    if base_is_run:  # continue from a run: its weights, config and tokenizer
        loaded = load_model(ft.base, seed=cfg.train.seed)
        cfg.model, tok, model = loaded.cfg, loaded.tokenizer, loaded.model
    if cfg.model.arch != "mbart":
        raise ConfigError(f"--model {ft.base}: --task text2text trains an encoder–decoder (arch mbart, e.g. preset "
                          f"seq2seq-tiny), not a {cfg.model.arch} model (for a decoder use --task sft)")
    if not base_is_run:
        tok = pair_tokenizer(cfg, splits["train"], out, resume, quiet)
        cfg.model.vocab_size = tok.vocab_size
        model = build_model(cfg.model)
    limit = min(ft.max_length, cfg.model.block_size)
    rows = {s: keep_fitting([(source_ids(tok, p.source), target_ids(tok, p.target)) for p in ps], limit, s, quiet,
                            "source or target + eos") for s, ps in splits.items()}
    steps_for(cfg, len(rows["train"]))
    B = cfg.data.batch_size
    batches, val = start_pair_run(cfg, tok, rows, "seq2seq", out, resume, overwrite)
    mean_len = sum(len(a) + len(b) for a, b in rows["train"]) / len(rows["train"])
    source_share = sum(len(a) for a, _ in rows["train"]) / (mean_len * len(rows["train"]))
    if not quiet:
        print(f"text2text: {cfg.model.arch} {model.num_params() / 1e6:.2f} M parameters "
              f"({cfg.model.n_encoder_layer}+{cfg.model.n_layer} layers x {cfg.model.n_embd}, vocabulary "
              f"{tok.vocab_size:,}) from {ft.base}; {len(rows['train']):,} train / {len(rows['validation']):,} "
              f"validation pairs of {cfg.data.path}; {cfg.train.max_steps} steps")
    t0 = time.perf_counter()
    result = train(model, Seq2Seq(tok, ft.label_smoothing), cfg.train, batches, val, out, resume=resume,
                   tokens_per_batch=round(mean_len * B),
                   flops_per_token=model.flops_per_token(round(mean_len / 2), source_share=source_share),
                   callbacks=list(callbacks), quiet=quiet)
    return summary(cfg, out, result, {"train_pairs": len(rows["train"]), "val_pairs": len(rows["validation"])},
                   time.perf_counter() - t0)
