"""`llmkit pretrain`: token shards + a RunConfig -> a run folder with a trained model.

The glue between config, data and the one loop: it builds the model for the data's vocabulary, records the
resolved config and the tokenizer in the run folder, and turns validation loss into perplexity and bits per byte.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from llmkit.config import RunConfig, save_yaml
from llmkit.data.batches import TokenBatches
from llmkit.data.shards import load_meta
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import ConfigError
from llmkit.files import atomic_write_text
from llmkit.model import build_model
from llmkit.model.loss import lm_figures
from llmkit.runtime import resolve_device
from llmkit.train import autosize
from llmkit.train.checkpoint import start_run_folder
from llmkit.train.distributed import setup_distributed
from llmkit.train.loop import TrainResult, train
from llmkit.train.objectives import get_objective


def pretrain(cfg: RunConfig, run_dir: str | Path, resume: bool = False, quiet: bool = False,
             callbacks=(), overwrite: bool = False) -> TrainResult:
    """Train into `run_dir`: a fresh run needs an unused folder (or `overwrite`); `resume` continues one."""
    run_dir = Path(run_dir)
    masked = cfg.train.objective in ("mlm", "mlm+nsp")
    if masked != (cfg.model.arch == "bert") or cfg.train.objective == "classify":
        raise ConfigError(f"train.objective {cfg.train.objective!r} does not pretrain model.arch {cfg.model.arch!r} "
                          "(bert: mlm or mlm+nsp; gpt2/llama: causal_lm; classify is for `llmkit finetune`)")
    if cfg.model.autosize:
        autosize.check(cfg)  # bad input fails before anything is measured or written
    meta = load_meta(cfg.data.path)
    cfg.model.vocab_size = meta["vocab_size"]  # the data decides the vocabulary
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    sized, auto = None, cfg.model.autosize
    if auto:  # time a few shapes, train the one the budget makes compute-optimal; refuse a used folder first,
        start_run_folder(run_dir, resume=resume, overwrite=overwrite)  # and seed after: the run's init stays put
        sized = autosize.resolve(cfg, run_dir, resume, quiet)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    if not auto:
        start_run_folder(run_dir, resume=resume, overwrite=overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, run_dir / "config.yaml")
    if sized:
        atomic_write_text(run_dir / autosize.RECORD, json.dumps(sized, indent=1) + "\n")
    tok_src = Path(cfg.data.path) / meta.get("tokenizer", "tokenizer")
    if tok_src.resolve() != (run_dir / "tokenizer").resolve():
        shutil.copytree(tok_src, run_dir / "tokenizer", dirs_exist_ok=True)

    ddp = setup_distributed(resolve_device(cfg.train.device))
    T, B = cfg.model.block_size, cfg.data.batch_size
    batches = TokenBatches(cfg.data.path, "train", T, B, seed=cfg.data.seed, rank=ddp.rank, world=ddp.world)
    # Each rank scores its slice of every validation batch (the loop averages them): one process's figures.
    val = TokenBatches(cfg.data.path, "val", T, B, seed=0, rank=ddp.rank, world=ddp.world).fixed(cfg.train.eval_iters)
    split = meta["splits"]["val"]

    def val_metrics(res: dict[str, float]) -> dict[str, float]:
        if cfg.train.objective != "causal_lm":  # perplexity / bits per byte describe next-token loss only
            return {}
        return {f"val_{k}": v for k, v in lm_figures(res["loss"], split["tokens"], split["bytes"]).items()}

    if not quiet:
        print(f"model: {cfg.model.arch} {model.num_params() / 1e6:.2f} M parameters, "
              f"{cfg.model.n_layer} layers x {cfg.model.n_embd} wide, context {T}; "
              f"data: {meta['splits']['train']['tokens']:,} train tokens from {meta['source']}")
    objective = get_objective(cfg.train.objective, tokenizer=Tokenizer.load(run_dir / "tokenizer"))
    head_share = getattr(objective, "mask_prob", 1.0)  # masked LM runs its head on the masked tokens only
    return train(model, objective, cfg.train, batches, val, run_dir, resume=resume,
                 tokens_per_batch=B * T, flops_per_token=model.flops_per_token(T, head_share), val_metrics=val_metrics,
                 callbacks=list(callbacks), quiet=quiet)
