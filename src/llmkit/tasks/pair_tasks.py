"""What the pair tasks (`llmkit finetune --task text2text` and `--task sft`) share: their config and defaults,
the pairs of the training and validation splits, the length filter, the step count, the batches and the run
folder's first write, and the summary printed."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from llmkit.config import MODEL_PRESETS, FinetuneRunConfig, load_yaml, save_yaml
from llmkit.data.pair_batches import PairBatches, fixed_pair_batches
from llmkit.data.pairs import Pair, load_pairs
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import ConfigError
from llmkit.tasks.finetune import finetune_config
from llmkit.train.checkpoint import start_run_folder
from llmkit.train.loop import TrainResult

PAIR_TASKS = ("text2text", "sft")


def pair_task_defaults(task: str, lora: bool) -> dict[str, Any]:
    """Hyper-parameters of a pair task that differ from pretraining's (dotted keys); any can be overridden."""
    common = {"finetune.max_length": 256, "train.min_lr_ratio": 0.1, "train.log_interval": 10,
              "train.select_metric": "val_loss"}
    if task == "text2text":  # a small Transformer from scratch: Vaswani et al.'s Adam betas, warmup, smoothing
        return {**common, "train.objective": "seq2seq", "data.batch_size": 32, "finetune.epochs": 10.0,
                "train.lr": 1e-3, "train.warmup_steps": 200, "train.weight_decay": 0.01, "train.beta2": 0.98,
                "train.eval_interval": 200, "train.eval_iters": 10}
    # sft: an instruct model nudged: a few hundred steps, small batches, frequent but cheap validation
    return {**common, "train.objective": "causal_lm", "data.batch_size": 8, "finetune.epochs": 1.0,
            "train.lr": 1e-3 if lora else 5e-5, "train.warmup_steps": 20, "train.weight_decay": 0.0,
            "train.beta2": 0.999, "train.eval_interval": 50, "train.eval_iters": 4}


def config_task(config_file: str | Path | None, overrides: dict[str, Any]) -> str:
    """The finetune task the command line or the recipe names (classify when neither does)."""
    values = load_yaml(config_file) if config_file else {}
    return str(overrides.get("finetune.task", (values.get("finetune") or {}).get("task", "classify")))


def pair_task_config(config_file: str | Path | None, overrides: dict[str, Any]) -> FinetuneRunConfig:
    """The run config of a text2text or sft fine-tune: the task's defaults, the recipe, the command line. A
    preset named by --model becomes the model section (recipe and command-line model keys still win)."""
    task = config_task(config_file, overrides)
    base = str(overrides.get("finetune.base", ""))
    if task == "text2text" and base in MODEL_PRESETS and not Path(base).exists():
        overrides = {**overrides, "model.preset": base}
    cfg = finetune_config(config_file, overrides, defaults_for=lambda lora: pair_task_defaults(task, lora))
    want = {"text2text": "seq2seq", "sft": "causal_lm"}[cfg.finetune.task]
    if cfg.train.objective != want:
        raise ConfigError(f"finetune --task {cfg.finetune.task} trains with objective {want}, not "
                          f"{cfg.train.objective!r}")
    return cfg


def pair_splits(cfg: FinetuneRunConfig) -> dict[str, list[Pair]]:
    """The training and validation pairs (first `max_*_examples` of each when those are set)."""
    ft = cfg.finetune
    out = {s: load_pairs(cfg.data.path, s, ft.source_field, ft.target_field) for s in ("train", "validation")}
    for split, cap in (("train", ft.max_train_examples), ("validation", ft.max_val_examples)):
        if cap:
            out[split] = out[split][:cap]
    return out


def keep_fitting(rows: list[tuple[list[int], list[int]]], limit: int, split: str, quiet: bool,
                 what: str) -> list[tuple[list[int], list[int]]]:
    """Drop examples with a side longer than `limit` tokens, with a warning: a truncated target would teach
    the model to stop mid-sentence, a truncated source to invent its end."""
    kept = [r for r in rows if max(len(r[0]), len(r[1])) <= limit]
    if len(kept) < len(rows) and not quiet:
        print(f"warning: dropped {len(rows) - len(kept)} of {len(rows)} {split} pairs longer than {limit} tokens "
              f"({what}; raise finetune.max_length up to the model's block_size)", file=sys.stderr)
    return kept


def steps_for(cfg: FinetuneRunConfig, n_train: int) -> None:
    """finetune.epochs (when > 0) sets train.max_steps."""
    if cfg.finetune.epochs > 0:
        cfg.train.max_steps = max(1, math.ceil(cfg.finetune.epochs * n_train / cfg.data.batch_size))


def summary(cfg: FinetuneRunConfig, out: Path, result: TrainResult, counts: dict[str, int],
            seconds: float, **extra: Any) -> dict[str, Any]:
    """What the CLI prints (and --json gives) after a pair fine-tune."""
    return {"run": str(out), "task": cfg.finetune.task, "base": cfg.finetune.base, "data": cfg.data.path,
            "steps": result.step, f"best_{cfg.train.select_metric}": result.best_val,
            "stopped_early": result.stopped_early, **counts, "train_minutes": round(seconds / 60, 2), **extra}


def start_pair_run(cfg: FinetuneRunConfig, tok: Tokenizer, rows: dict[str, list[tuple[list[int], list[int]]]],
                   kind: str, out: Path, resume: bool, overwrite: bool) -> tuple[PairBatches, list]:
    """The train batches and fixed validation batches of `rows` ("seq2seq" or "causal" pairs), then the run
    folder's first write (config + tokenizer): every check has passed by now."""
    B = cfg.data.batch_size
    batches = PairBatches(*map(list, zip(*rows["train"])), B, tok.pad_id, kind, seed=cfg.data.seed)
    val = fixed_pair_batches(*map(list, zip(*rows["validation"])), B, tok.pad_id, kind,
                             max_batches=cfg.train.eval_iters)
    start_run_folder(out, resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    tok.save(out / "tokenizer")
    return batches, val
