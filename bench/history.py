"""The seeds' history in numbers: n-gram (Kneser–Ney, orders 3 and 5) -> LSTM -> Transformer on Shakespeare.

Every model reads the same token shards (`llmkit prepare --corpus shakespeare` with the demo's 4,096-token BPE)
and is scored on the same whole validation split in bits per byte, the same denominator (`model.loss.lm_figures`
over the split's UTF-8 bytes): the n-grams by `llmkit.baselines.ngram` (what `llmkit ngram` runs), the LSTM and
the Transformer by `llmkit eval`'s `evaluate_lm` after training through the one loop (`llmkit pretrain`) under the
same wall-clock budget (`--minutes`, train.max_minutes: the loop times its first steps and plans how many fit).
An n-gram model "trains" by counting, in seconds; its fit time is reported beside the budget, not stretched to it.

Printed as JSON lines: a `machine` header (CPU model and flags), one `model` line per model (bits per byte,
loss, perplexity, parameters or n-grams, training seconds, steps, tokens seen), then a `table` line; a
Markdown table goes to stderr, and one PNG (validation bits per byte against training wall-clock seconds: the
neural models' curves from their metrics.jsonl, the n-grams as points at their fit time) to --out.

    python bench/history.py --minutes 10 [--data data/shakespeare] [--out runs/bench-history]
        [--orders 3,5] [--transformer-config configs/demo.yaml] [--lstm-config configs/lstm-shakespeare.yaml]

The data folder is made when missing (BPE 4,096 on Shakespeare, then `prepare`: what `make demo` does). The
curves' points are the loop's validation estimates (train.eval_iters windows), the table's figures the whole
split. Timings taken on a shared machine are noisy: a busy CPU gives each model fewer steps, the LSTM most of all
(its time steps run one after another, where a Transformer's run in parallel).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llmkit.baselines.ngram import fit_and_score
from llmkit.config import load_run_config
from llmkit.data.shards import load_meta, prepare
from llmkit.infer.api import load
from llmkit.infer.evaluate import evaluate_lm
from llmkit.plots import pyplot, save_figure
from llmkit.train.pretrain import pretrain
from train_throughput import machine


def ensure_data(data: Path) -> None:
    """The demo's shards: a BPE-4k tokenizer trained on Shakespeare, then the corpus prepared with it (once)."""
    if (data / "meta.json").is_file():
        return
    from llmkit.data.shards import iter_texts
    from llmkit.data.tokenizer import Tokenizer

    tok_dir = data.parent / f"{data.name}-tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        Tokenizer.train_bpe(iter_texts("shakespeare"), vocab_size=4096).save(tok_dir)
    prepare("shakespeare", tok_dir, data, quiet=True)


def curve(run: Path) -> list[tuple[float, float]]:
    """(elapsed training seconds, validation bits per byte) at every evaluation of a run."""
    points, elapsed = [], 0.0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        elapsed = rec.get("elapsed_s", elapsed)
        if "val_bits_per_byte" in rec:
            points.append((elapsed, rec["val_bits_per_byte"]))
    return points


def neural(name: str, config: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train `config` under the budget through the one loop, then score the whole validation split."""
    overrides = {"data.path": str(args.data), "train.max_minutes": args.minutes, "train.max_steps": 1_000_000,
                 "train.eval_interval": args.eval_interval}
    if args.threads:
        overrides["train.threads"] = args.threads
    cfg = load_run_config(config, overrides)
    run = args.out / name
    t0 = time.perf_counter()
    result = pretrain(cfg, run, quiet=args.quiet, overwrite=True)
    train_s = time.perf_counter() - t0
    llm = load(run, device=cfg.train.device)
    t1 = time.perf_counter()
    res = evaluate_lm(llm, args.data, split="val", quiet=args.quiet)
    tokens = result.step * cfg.data.batch_size * cfg.model.block_size * cfg.train.grad_accum
    return {"bench": "model", "model": name, "config": config, "arch": cfg.model.arch,
            "params": llm.model.num_params(), "layers": cfg.model.n_layer, "width": cfg.model.n_embd,
            "context": cfg.model.block_size, "bits_per_byte": res["bits_per_byte"], "loss": res["loss"],
            "perplexity": res["perplexity"], "train_seconds": round(train_s, 1), "steps": result.step,
            "train_tokens_seen": tokens, "eval_seconds": round(time.perf_counter() - t1, 1),
            "curve": [(round(t, 1), round(b, 4)) for t, b in curve(run)]}


def ngram(order: int, args: argparse.Namespace) -> dict[str, Any]:
    res = fit_and_score(args.data, order, split="val")
    return {"bench": "model", "model": f"ngram-{order}", "arch": "kneser-ney", "ngrams": sum(res["ngrams"]),
            "bits_per_byte": res["bits_per_byte"], "loss": res["loss"], "perplexity": res["perplexity"],
            "train_seconds": res["fit_seconds"], "train_tokens_seen": res["train_tokens"],
            "eval_seconds": res["score_seconds"]}


def table(rows: list[dict[str, Any]], minutes: float) -> str:
    lines = [f"Shakespeare validation split, {minutes:g}-minute training budget per model (bits per byte: lower is "
             "better)", "", "| model | size | trained (s) | steps | train tokens seen | bits/byte |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        size = f"{r['ngrams']:,} n-grams" if "ngrams" in r else f"{r['params'] / 1e6:.2f} M params"
        lines.append(f"| {r['model']} | {size} | {r['train_seconds']:.1f} | {r.get('steps', '-')} | "
                     f"{r['train_tokens_seen']:,} | {r['bits_per_byte']:.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, minutes: float) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, r in enumerate(rows):
        color = f"C{i}"
        if "curve" in r and r["curve"]:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker="o", markersize=3, color=color,
                    label=f"{r['model']} ({r['bits_per_byte']:.3f} on the split)")
        else:  # counted, not trained: a point at its fit time and a line to compare the curves with
            ax.scatter([max(r["train_seconds"], 0.1)], [r["bits_per_byte"]], marker="s", zorder=3, color=color,
                       label=f"{r['model']} ({r['bits_per_byte']:.3f})")
            ax.axhline(r["bits_per_byte"], color=color, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("training wall-clock seconds (log scale)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(f"n-gram -> LSTM -> Transformer on Shakespeare, {minutes:g} min budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per neural model (default 10)")
    ap.add_argument("--data", type=Path, default=Path("data/shakespeare"), help="token shards (made if missing)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-history"), help="run folders, history.png")
    ap.add_argument("--orders", default="3,5", help="n-gram orders, comma-separated (default 3,5)")
    ap.add_argument("--transformer-config", default="configs/demo.yaml")
    ap.add_argument("--lstm-config", default="configs/lstm-shakespeare.yaml")
    ap.add_argument("--eval-interval", type=int, default=50, help="steps between the curves' points")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for training (0 = default)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()
    ensure_data(args.data)
    meta = load_meta(args.data)
    print(json.dumps({**machine(), "bench": "history", "minutes": args.minutes, "data": str(args.data),
                      "val_tokens": meta["splits"]["val"]["tokens"], "val_bytes": meta["splits"]["val"]["bytes"],
                      "train_tokens": meta["splits"]["train"]["tokens"], "vocab_size": meta["vocab_size"]}),
          flush=True)
    rows = []
    for order in (int(o) for o in args.orders.split(",") if o):
        rows.append(ngram(order, args))
        print(json.dumps(rows[-1]), flush=True)
    for name, config in (("lstm", args.lstm_config), ("transformer", args.transformer_config)):
        rows.append(neural(name, config, args))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(rows, args.out / "history.png", args.minutes)
    print(json.dumps({"bench": "table", "bits_per_byte": {r["model"]: round(r["bits_per_byte"], 4) for r in rows},
                      "png": str(args.out / "history.png"), "torch_threads": torch.get_num_threads()}))
    print(table(rows, args.minutes), file=sys.stderr)


if __name__ == "__main__":
    main()
