"""KJV -> WEB on the held-out test books (Acts, James): how far each approach gets past copying the source.

Systems, scored on the same test verses by the same function (`text2text_scores`: sacreBLEU BLEU and chrF++ with
their signatures, rouge-score ROUGE-L):
  copy      the source unchanged: the floor (KJV and WEB share most of their words)
  seq2seq   an encoder–decoder trained from scratch (`llmkit finetune --task text2text`, preset `--preset`,
            default seq2seq-small) for `--minutes` of wall time, greedy or `--beam` decoding
  sft       SmolLM2-135M-Instruct + LoRA SFT (`llmkit finetune --task sft --lora`) for `--sft-minutes`
  zeroshot  SmolLM2-135M-Instruct as it ships, asked with the same instruction SFT trains on
Training runs inside the wall-time budget through the loop's `train.max_minutes` (the schedule is fitted to it).
Decoding is done by `llmkit eval --task text2text`'s function, whose predictions files stay in `--out`.

Output (JSON lines, stdout): the machine; one line per system (scores, signature, train/decode time); five test
verses side by side (source, reference, every system's output); a summary (the best system and its margin over
copy, in BLEU).

    nice -n 19 python bench/text2text.py --out runs/bench-text2text [--minutes 30] [--sft-minutes 30]
        [--test-limit N] [--systems copy,seq2seq,sft,zeroshot] [--beam 1] [--threads 2]

`--test-limit N` scores the first N test verses only (quick looks; the full test split is 1,115 verses).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from llmkit.data.pairs import BIBLE_SPLITS, load_pairs
from llmkit.tasks.pair_tasks import pair_task_config
from llmkit.tasks.sft import sft
from llmkit.tasks.text2text import text2text
from llmkit.text2text.evaluate import evaluate_text2text
from llmkit.text2text.metrics import text2text_scores
from train_throughput import machine

DATA = "bible-kjv-web"
BASE = "smollm2-135m-instruct"
SYSTEMS = ("copy", "seq2seq", "sft", "zeroshot")
SHOWN = 5  # test verses shown side by side
BIG_STEPS = 1_000_000  # the time budget, not a step count, ends training


def emit(record: dict) -> None:
    print(json.dumps(record, ensure_ascii=False), flush=True)


def scored(system: str, scores: dict, **extra) -> dict:
    keep = ("bleu", "chrf", "rougeL", "rouge1", "rouge2", "exact_match", "examples", "bleu_signature",
            "chrf_signature")
    return {"system": system, **{k: scores[k] for k in keep if k in scores}, **extra}


def train_seq2seq(args: argparse.Namespace, out: Path) -> dict:
    """The from-scratch encoder–decoder, trained for `--minutes`; returns its summary plus pairs seen."""
    cfg = pair_task_config(None, {"finetune.task": "text2text", "finetune.base": args.preset, "data.path": DATA,
                                  "train.max_steps": BIG_STEPS, "train.max_minutes": args.minutes,
                                  "train.threads": args.threads, **dict(args.seq2seq_set or [])})
    summary = text2text(cfg, out, quiet=args.quiet, overwrite=True)
    return {**summary, "pairs_seen": summary["steps"] * cfg.data.batch_size}


def train_sft(args: argparse.Namespace, out: Path) -> dict:
    """SmolLM2 + LoRA, trained for `--sft-minutes`; returns its summary plus pairs seen."""
    cfg = pair_task_config(None, {"finetune.task": "sft", "finetune.base": BASE, "finetune.lora": True,
                                  "data.path": DATA, "train.max_steps": BIG_STEPS,
                                  "train.max_minutes": args.sft_minutes, "train.threads": args.threads,
                                  **dict(args.sft_set or [])})
    summary = sft(cfg, out, quiet=args.quiet, overwrite=True)
    return {**summary, "pairs_seen": summary["steps"] * cfg.data.batch_size}


def evaluate(args: argparse.Namespace, system: str, model: str | Path, out: Path, **extra) -> tuple[dict, Path]:
    path = out / f"predictions-{system}.jsonl"
    kind_args = {"beam": args.beam} if system == "seq2seq" else {"max_new_tokens": args.max_new_tokens}
    rep = evaluate_text2text(model, DATA, "test", limit=args.test_limit, predictions=path,
                             batch_size=args.batch_size, quiet=args.quiet, **kind_args)
    return scored(system, rep, decode_seconds=rep["decode_seconds"], truncated=rep["truncated"], **extra), path


def key_value(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    if not value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-text2text", help="folder for the runs and the predictions")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-time budget of the from-scratch training")
    ap.add_argument("--sft-minutes", type=float, default=30.0, help="wall-time budget of the LoRA SFT")
    ap.add_argument("--preset", default="seq2seq-small", help="the encoder–decoder's model preset")
    ap.add_argument("--test-limit", type=int, default=0, help="score the first N test verses only (0 = all)")
    ap.add_argument("--beam", type=int, default=1, help="beam size of the encoder–decoder's decoding")
    ap.add_argument("--max-new-tokens", type=int, default=160, help="the decoders' answer limit (tokens)")
    ap.add_argument("--batch-size", type=int, default=16, help="decoding batch size")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--seq2seq-set", type=key_value, action="append", metavar="KEY=VALUE",
                    help="extra config for the from-scratch run, e.g. data.batch_size=64 (repeatable)")
    ap.add_argument("--sft-set", type=key_value, action="append", metavar="KEY=VALUE",
                    help="extra config for the SFT run, e.g. train.lr=2e-3 (repeatable)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        sys.exit(f"error: unknown system(s) {unknown} (valid: {', '.join(SYSTEMS)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test = load_pairs(DATA, "test")
    if args.test_limit:
        test = test[:args.test_limit]
    emit({**machine(), "bench": "text2text", "data": DATA, "test_books": list(BIBLE_SPLITS["test"]),
          "test_verses": len(test), "systems": systems})

    results, predictions = {}, {}
    if "copy" in systems:
        results["copy"] = scored("copy", text2text_scores([p.source for p in test], [p.target for p in test]))
        emit(results["copy"])
    if "seq2seq" in systems:
        t0 = time.perf_counter()
        summary = train_seq2seq(args, out / "seq2seq")
        results["seq2seq"], predictions["seq2seq"] = evaluate(
            args, "seq2seq", out / "seq2seq", out, preset=args.preset, steps=summary["steps"],
            pairs_seen=summary["pairs_seen"], beam=args.beam,
            train_minutes=round((time.perf_counter() - t0) / 60, 2), best_val_loss=summary["best_val_loss"])
        emit(results["seq2seq"])
    if "sft" in systems:
        t0 = time.perf_counter()
        summary = train_sft(args, out / "sft")
        results["sft"], predictions["sft"] = evaluate(
            args, "sft", out / "sft", out, base=BASE, lora=True, steps=summary["steps"],
            pairs_seen=summary["pairs_seen"],
            train_minutes=round((time.perf_counter() - t0) / 60, 2), best_val_loss=summary["best_val_loss"])
        emit(results["sft"])
    if "zeroshot" in systems:
        results["zeroshot"], predictions["zeroshot"] = evaluate(args, "zeroshot", BASE, out, base=BASE)
        emit(results["zeroshot"])

    outputs = {s: [json.loads(x)["prediction"] for x in p.read_text(encoding="utf-8").splitlines()]
               for s, p in predictions.items()}
    step = max(1, len(test) // SHOWN)
    for i in list(range(0, len(test), step))[:SHOWN]:
        emit({"verse": test[i].ref, "source": test[i].source, "reference": test[i].target,
              **({"copy": test[i].source} if "copy" in results else {}),
              **{s: outputs[s][i] for s in outputs}})
    if results:
        best = max(results, key=lambda s: results[s]["bleu"])
        line = {"summary": True, "best": best, "best_bleu": results[best]["bleu"],
                **{f"{s}_bleu": r["bleu"] for s, r in results.items()}}
        if "copy" in results:
            line["best_minus_copy_bleu"] = round(results[best]["bleu"] - results["copy"]["bleu"], 2)
        emit(line)


if __name__ == "__main__":
    main()
