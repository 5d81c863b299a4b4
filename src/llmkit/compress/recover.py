"""A short recovery fine-tune after pruning: next-token training on `llmkit prepare` shards, in the one loop.

Pruning removes what the rest of the network had learned to lean on; a few hundred steps of ordinary causal-LM
training let the remaining weights take over (LLM-Pruner, Sheared-LLaMA). It runs `train/loop.train` with
pretrain's batches (`data/batches.TokenBatches`) in a throw-away folder, full or LoRA (`tasks/finetune.add_lora`,
merged back so the result needs no peft). Weights that unstructured pruning zeroed stay zero: their gradients are
masked (AdamW then never moves them: no gradient, no moment, and decay of zero is zero); LoRA's merged update
is masked again after the merge.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmkit.config import FinetuneConfig, FinetuneRunConfig, TrainConfig
from llmkit.data.batches import TokenBatches
from llmkit.data.shards import load_meta
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import DataError
from llmkit.runtime import resolve_device, resolve_dtype
from llmkit.tasks.finetune import add_lora
from llmkit.train.loop import evaluate, train
from llmkit.train.objectives import CausalLM

EVAL_BATCHES = 8  # validation batches scored before and after recovery


def check_recovery_data(data: str | Path | None, tokenizer: Tokenizer) -> Path:
    """A `llmkit prepare` folder tokenised with the model's own vocabulary, or a one-line error."""
    if data is None:
        raise DataError("--recover-steps needs --data, a folder written by `llmkit prepare` with the model's "
                        "tokenizer")
    p = Path(data)
    if not (p / "meta.json").is_file():
        raise DataError(f"--data {p}: not a `llmkit prepare` folder (no meta.json); prepare it with "
                        "`llmkit prepare --tokenizer <the model's tokenizer>`")
    meta = load_meta(p)
    if meta["vocab_size"] != tokenizer.vocab_size:
        raise DataError(f"--data {p} was tokenized with a {meta['vocab_size']}-token vocabulary, the model uses "
                        f"{tokenizer.vocab_size}; prepare it with the model's tokenizer")
    return p


def recover(model: nn.Module, data: Path, steps: int, lora: bool = False, lr: float | None = None,
            batch_size: int = 8, seq_len: int = 256, masks: dict[str, Tensor] | None = None, device: str = "auto",
            dtype: str = "auto", seed: int = 0, quiet: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Train `model` for `steps` on `data`'s train split; return the (merged) model and {steps, lora, lr,
    tokens, val_loss_before, val_loss_after, val_perplexity_before/after} on `data`'s val split."""
    cfg = model.cfg  # type: ignore[attr-defined]
    T = min(seq_len, cfg.block_size)
    lr = lr if lr is not None else (1e-3 if lora else 1e-4)
    batches = TokenBatches(data, "train", T, batch_size, seed=seed)
    val = TokenBatches(data, "val", T, batch_size, seed=0).fixed(EVAL_BATCHES)
    tcfg = TrainConfig(max_steps=steps, lr=lr, warmup_steps=min(20, steps // 10), weight_decay=0.0,
                       eval_interval=0, save_interval=0, eval_iters=1, log_interval=max(1, steps // 20),
                       device=device, dtype=dtype, seed=seed)
    dev = resolve_device(device)
    objective = CausalLM()

    def val_loss() -> float:
        return evaluate(model.to(dev), objective, val, dev, resolve_dtype(dtype, dev))["loss"]

    before = val_loss()
    torch.manual_seed(seed)
    hooks = []
    trained: nn.Module = model
    if lora:
        trained = add_lora(model, FinetuneRunConfig(model=cfg, finetune=FinetuneConfig(lora=True)))
    else:
        modules = dict(model.named_modules())
        for name, keep in (masks or {}).items():
            w = modules[name].weight
            hooks.append(w.register_hook(lambda g, k=keep.to(w.device, w.dtype): g * k))
    work = Path(tempfile.mkdtemp(prefix="llmkit-recover-"))
    try:
        train(trained, objective, tcfg, batches, [], work, quiet=quiet)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for h in hooks:
            h.remove()
    if lora:
        model = trained.merge_and_unload()  # type: ignore[operator]
    if masks:
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, keep in masks.items():
                modules[name].weight.mul_(keep.to(modules[name].weight.device, modules[name].weight.dtype))
    model.eval()
    after = val_loss()
    return model, {"steps": steps, "lora": lora, "lr": lr, "data": str(data), "tokens": steps * batch_size * T,
                   "val_loss_before": before, "val_loss_after": after,
                   "val_perplexity_before": math.exp(min(before, 50.0)),
                   "val_perplexity_after": math.exp(min(after, 50.0))}
