"""Quality per CPU-minute: validation bits per byte against model size, vocabulary and context at fixed budgets.

Each point is a real run of `llmkit pretrain` (train.pretrain.pretrain, the one loop) with configs/demo.yaml's
recipe (batch, learning rate, warmup, evaluation cadence) under `train.max_minutes`, one shape from the
autosize ladder (`LAYERSxWIDTH`, heads and MLP by train/autosize.py's rule), on Shakespeare tokenized with a BPE
of 1k/2k/4k/8k tokens (or `char`), then scored like `make demo` scores its model: `llmkit eval` over the whole
validation split (infer.evaluate.evaluate_lm), bits per byte. The tokenizers and token shards are made once, by
the functions `llmkit tokenizer train` and `llmkit prepare` run, and cached under data/sweep/.

Points: every shape at every (vocabulary, base context) and at every (base vocabulary, context), for each budget;
plus `auto` (model.preset auto: what the rule picks, for the acceptance check "within 3 % of the best") at the
base vocabulary and context. Each finished point is appended as one JSON line to --results (after a header line
with the machine), so a sweep runs in chunks: an interrupted or repeated command skips the points already there.
`--report` (also printed at the end of every sweep) trains nothing: the table of bits per byte, the best point
per budget, the tokens-per-parameter constant k of autosize's rule fitted to each budget's curve, and a PNG (bits
per byte against parameters, one curve per budget, one panel per vocabulary, one for the contexts).

    nice -n 19 python bench/sweep.py --budgets 2 [--vocabs 1024,2048,4096,8192] [--contexts 128,256,512]
        [--shapes auto,2x64,2x96,3x128,4x192,6x256,6x384] [--base-vocab 4096] [--base-context 256]
        [--set train.lr=0.003] [--results bench/results/sweep.jsonl] [--plot bench/results/sweep.png]
    python bench/sweep.py --report

A point costs its budget plus about half a minute (model set-up, the final full-split evaluation); the default
grid is 6 shapes x (4 vocabularies + 2 more contexts) + 1 auto = 37 points per budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.config import load_run_config
from llmkit.data.shards import iter_texts, load_meta, prepare
from llmkit.data.tokenizer import Tokenizer
from llmkit.infer.api import load
from llmkit.infer.evaluate import evaluate_lm
from llmkit.model import build_model
from llmkit.plots import pyplot, save_figure
from llmkit.train import autosize
from llmkit.train.checkpoint import remove_outputs
from llmkit.train.pretrain import pretrain
from train_throughput import machine

DATA = Path("data/sweep")
RUNS = Path("runs/sweep")
SHAPES = "auto,2x64,2x96,3x128,4x192,6x256,6x384"


def data_for(vocab: str, corpus: str, quiet: bool) -> Path:
    """Token shards of `corpus` with a BPE of `vocab` tokens (or `char`), made once and reused."""
    out = DATA / f"{corpus}-{'char' if vocab == 'char' else 'bpe' + vocab}"
    if (out / "meta.json").is_file():
        return out
    tok_dir = DATA / f"{out.name}-tokenizer"
    texts = iter_texts(corpus)
    tok = Tokenizer.train_char(texts) if vocab == "char" else Tokenizer.train_bpe(texts, int(vocab))
    tok.save(tok_dir)
    prepare(corpus, tok_dir, out, quiet=quiet)
    return out


def point_key(budget: float, vocab: str, context: int, shape: str, sets: list[str]) -> str:
    extra = "".join(f"-{s.replace('=', '_')}" for s in sorted(sets))
    return f"b{budget:g}-v{vocab}-t{context}-{shape}{extra}"


def plan_points(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every shape at (each vocabulary, base context) and (base vocabulary, each context); auto at the bases."""
    points = []
    for budget in args.budgets:
        combos = [(v, args.base_context) for v in args.vocabs] + [(args.base_vocab, c) for c in args.contexts]
        for vocab, context in dict.fromkeys(combos):
            for shape in args.shapes:
                if shape == "auto" and (vocab, context) != (args.base_vocab, args.base_context):
                    continue
                points.append({"key": point_key(budget, vocab, context, shape, args.set), "budget_min": budget,
                               "vocab": vocab, "context": context, "shape": shape})
    return points


def run_point(p: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Train one point through `pretrain` and score it on the whole validation split, as `make demo` does."""
    data = data_for(p["vocab"], args.corpus, args.quiet)
    overrides: dict[str, Any] = {"data.path": str(data), "train.max_minutes": p["budget_min"],
                                 "train.max_steps": 10**9, "model.block_size": p["context"], **args.overrides}
    if p["shape"] == "auto":
        overrides = {"model": {"preset": "auto"}, **overrides}
    cfg = load_run_config(args.config, overrides)
    if p["shape"] != "auto":  # the recipe's model flavour (the demo's: tiny) in this shape
        cfg.model = autosize.shape_config(cfg.model, *autosize.parse_shape(p["shape"]))
    run_dir = RUNS / p["key"]
    load_before = os.getloadavg()[0]  # another job on the machine slows the run: its points are suspect
    t0 = time.perf_counter()
    result = pretrain(cfg, run_dir, overwrite=True, quiet=args.quiet)
    t1 = time.perf_counter()
    scored = evaluate_lm(load(run_dir, device=cfg.train.device), data, quiet=True)
    remove_outputs(run_dir, ("checkpoints",))  # weights, config and metrics stay; the resumable state goes
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plan = next((m for m in metrics if "planned_steps" in m), {})
    tps = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s") and m["step"] > plan.get("step", 0)]
    per_step = cfg.data.batch_size * cfg.model.block_size * cfg.train.grad_accum
    train_tokens = load_meta(data)["splits"]["train"]["tokens"]
    with torch.device("meta"):
        model = build_model(cfg.model)
    record = {**p, "auto": p["shape"] == "auto", "shape": f"{cfg.model.n_layer}x{cfg.model.n_embd}",
              "n_head": cfg.model.n_head,
              "vocab_size": cfg.model.vocab_size, "params": model.num_params(),
              "flops_per_token": model.flops_per_token(cfg.model.block_size),
              "val_bpb": round(scored["bits_per_byte"], 4), "val_loss": round(scored["loss"], 4),
              "steps": result.step, "planned_steps": plan.get("planned_steps"),
              "tokens_seen": result.step * per_step, "epochs": round(result.step * per_step / train_tokens, 2),
              "tokens_per_s": round(statistics.median(tps), 1) if tps else None,
              "train_s": round(t1 - t0, 1), "eval_s": round(time.perf_counter() - t1, 1), "lr": cfg.train.lr,
              "batch_size": cfg.data.batch_size, "set": args.set,
              "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if p["shape"] == "auto":
        record["autosize"] = json.loads((run_dir / autosize.RECORD).read_text())
    return record


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: that point runs again
            continue
    return rows


# ------------------------------------------------------------------------------------------------ the report


def fit_k(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """Where one budget's curve (fixed vocabulary and context, shapes by size) bottoms out, and autosize's k there.

    A parabola in log(parameters) through the best point and its two neighbours gives the optimal size N*; the
    throughput there is interpolated (log-log) between them; k = tokens/s x budget seconds / N*, the tokens per
    parameter the rule must ask for to pick N*. A best point at either end only bounds k."""
    rows = sorted((r for r in curve if r.get("tokens_per_s")), key=lambda r: r["params"])
    if len(rows) < 2:
        return {}
    i = min(range(len(rows)), key=lambda j: rows[j]["val_bpb"])
    budget_s = rows[0]["budget_min"] * 60
    at_best = rows[i]["tokens_per_s"] * budget_s / rows[i]["params"]
    out = {"best": rows[i]["shape"], "best_bpb": rows[i]["val_bpb"], "k_at_best": round(at_best, 2)}
    if i == 0 or i == len(rows) - 1:  # the optimum is at or beyond the end of the swept sizes
        return {**out, "k": None, "k_bound": (">=" if i == 0 else "<=") + f" {at_best:.3g}"}
    x = np.log([rows[j]["params"] for j in (i - 1, i, i + 1)])
    y = [rows[j]["val_bpb"] for j in (i - 1, i, i + 1)]
    a, b, _ = np.polyfit(x, y, 2)
    x_opt = float(np.clip(-b / (2 * a), x[0], x[2])) if a > 0 else float(x[1])
    lo, hi = (i - 1, i) if x_opt <= x[1] else (i, i + 1)
    xs = np.log([rows[lo]["params"], rows[hi]["params"]])
    ts = np.log([rows[lo]["tokens_per_s"], rows[hi]["tokens_per_s"]])
    tps_opt = math.exp(float(np.interp(x_opt, xs, ts)))
    return {**out, "n_opt": round(math.exp(x_opt)), "k": round(tps_opt * budget_s / math.exp(x_opt), 2)}


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Markdown tables (one row per budget and vocabulary/context, one column per shape), fits, the auto check."""
    cfg = load_run_config(args.config, args.overrides)
    recipe = {"batch_size": cfg.data.batch_size, "lr": cfg.train.lr}
    done = [r for r in rows if "val_bpb" in r and r.get("set", []) == args.set]
    points = [r for r in done if all(r.get(k) == v for k, v in recipe.items())]
    if len(points) < len(done):  # an earlier recipe of --config (its batch or lr changed since): not comparable
        print(f"left out: {len(done) - len(points)} points trained with another batch size or lr than {args.config}'s "
              f"{recipe}")
    if not points:
        print("no finished points in", args.results)
        return
    fixed = [r for r in points if not r.get("auto")]
    shapes = sorted({r["shape"] for r in fixed}, key=lambda s: autosize.parse_shape(s)[:2][::-1])
    print("| budget | vocab | context | " + " | ".join(shapes) + " | best | k |")
    print("|---" * (len(shapes) + 5) + "|")
    ks: dict[float, float] = {}
    for (budget, vocab, context), curve in sorted(_curves(fixed).items(), key=lambda kv: _order(kv[0])):
        by_shape = {r["shape"]: r for r in curve}
        fit = fit_k(curve)
        if (vocab, context) == (args.base_vocab, args.base_context) and fit.get("k"):
            ks[budget] = fit["k"]
        cells = [f"{by_shape[s]['val_bpb']:.3f}" if s in by_shape else "" for s in shapes]
        k = fit.get("k") or fit.get("k_bound", "")
        print(f"| {budget:g} min | {vocab} | {context} | " + " | ".join(cells)
              + f" | {fit.get('best', '')} {fit.get('best_bpb', '')} | {k} |")
    for budget in sorted({r["budget_min"] for r in points}):
        best = min((r for r in fixed if r["budget_min"] == budget), key=lambda r: r["val_bpb"], default=None)
        if best is None:
            continue
        for auto in (r for r in points if r["budget_min"] == budget and r.get("auto")):
            gap = f"{auto['val_bpb'] / best['val_bpb'] - 1:+.1%}"
            print(f"auto at {budget:g} min: chose {auto['shape']} ({auto['params'] / 1e6:.3g} M), "
                  f"{auto['val_bpb']:.3f} bits per byte; sweep's best {best['shape']} v{best['vocab']} "
                  f"t{best['context']} {best['val_bpb']:.3f} ({gap})")
    if ks:
        geo = math.exp(statistics.fmean(math.log(k) for k in ks.values()))
        print(f"k fitted at vocabulary {args.base_vocab}, context {args.base_context}: "
              + ", ".join(f"{b:g} min {k:g}" for b, k in sorted(ks.items())) + f"; geometric mean {geo:.3g} "
              f"(autosize.TOKENS_PER_PARAM is {autosize.TOKENS_PER_PARAM:g})")
    plot(fixed, points, args)


def _curves(rows: list[dict[str, Any]]) -> dict[tuple[float, str, int], list[dict[str, Any]]]:
    out: dict[tuple[float, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["budget_min"], r["vocab"], r["context"]), []).append(r)
    return out


def _order(key: tuple[float, str, int]) -> tuple[float, float, int]:
    budget, vocab, context = key
    return budget, 0 if vocab == "char" else int(vocab), context


def plot(fixed: list[dict[str, Any]], points: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Bits per byte against parameters, one curve per budget: a panel per vocabulary (base context), one per
    context (base vocabulary); auto's picks as stars."""
    curves = _curves(fixed)
    vocabs = sorted({v for _, v, c in curves if c == args.base_context}, key=lambda v: _order((0, v, 0)))
    contexts = sorted({c for _, v, c in curves if v == args.base_vocab})
    panels = [(f"vocabulary {v}, context {args.base_context}", v, None) for v in vocabs]
    if len(contexts) > 1:
        panels.append((f"vocabulary {args.base_vocab}, contexts", args.base_vocab, contexts))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), dpi=110, sharey=True, squeeze=False)
    budgets = sorted({b for b, _, _ in curves})
    colors = {b: plt.cm.viridis(i / max(1, len(budgets) - 1)) for i, b in enumerate(budgets)}
    styles = ["-", "--", ":", "-."]
    for ax, (title, vocab, ctxs) in zip(axes[0], panels):
        for (budget, v, c), curve in sorted(curves.items(), key=lambda kv: _order(kv[0])):
            if v != vocab or (ctxs is None and c != args.base_context):
                continue
            curve = sorted(curve, key=lambda r: r["params"])
            style = styles[ctxs.index(c) % len(styles)] if ctxs else "-"
            label = f"{budget:g} min" + (f", context {c}" if ctxs else "")
            ax.plot([r["params"] for r in curve], [r["val_bpb"] for r in curve], style, marker="o", ms=3,
                    color=colors[budget], label=label)
        if ctxs is None and vocab == args.base_vocab:
            for r in points:
                if r.get("auto") and r["context"] == args.base_context:
                    ax.plot(r["params"], r["val_bpb"], "*", ms=12, color=colors.get(r["budget_min"], "k"),
                            markeredgecolor="k", label=f"auto, {r['budget_min']:g} min")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation bits per byte")
    save_figure(fig, args.plot)
    print(f"wrote {args.plot}")


# -------------------------------------------------------------------------------------------------- the sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="2", help="minutes of training per point, comma-separated (e.g. 2,5,10,30)")
    ap.add_argument("--vocabs", default="1024,2048,4096,8192", help="BPE vocabulary sizes (or `char`), comma-separated")
    ap.add_argument("--contexts", default="128,256,512", help="context lengths swept at --base-vocab, comma-separated")
    ap.add_argument("--shapes", default=SHAPES, help="LAYERSxWIDTH shapes and/or `auto`, comma-separated")
    ap.add_argument("--base-vocab", default="4096", help="the vocabulary the contexts and auto are swept at")
    ap.add_argument("--base-context", type=int, default=256, help="the context the vocabularies are swept at")
    ap.add_argument("--config", default="configs/demo.yaml", help="the recipe every point starts from")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every point (e.g. train.lr=0.003); part of the point's name")
    ap.add_argument("--corpus", default="shakespeare", help="built-in corpus name or text file")
    ap.add_argument("--results", type=Path, default=Path("bench/results/sweep.jsonl"), help="JSON lines, appended")
    ap.add_argument("--plot", type=Path, default=Path("bench/results/sweep.png"), help="the PNG --report writes")
    ap.add_argument("--report", action="store_true", help="train nothing: table, fits and plot from --results")
    ap.add_argument("--dry-run", action="store_true", help="list the points still to run and stop")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.vocabs = args.vocabs.split(",")
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.shapes = args.shapes.split(",")
    for shape in args.shapes:
        if shape != "auto":
            autosize.parse_shape(shape)  # a typo fails now, not an hour in
    args.set = sorted(args.set)
    args.overrides = dict(s.split("=", 1) for s in args.set)  # --set KEY=VALUE, as config overrides
    if args.report:
        return report(read_results(args.results), args)
    done = {r["key"] for r in read_results(args.results) if "val_bpb" in r}
    todo = [p for p in plan_points(args) if p["key"] not in done]
    minutes = sum(p["budget_min"] + 0.5 for p in todo)
    print(f"{len(todo)} points to run (about {minutes / 60:.1f} h), {len(done)} already in {args.results}",
          file=sys.stderr)
    if args.dry_run:
        for p in todo:
            print(p["key"])
        return None
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a", encoding="utf-8") as f:
        f.write(json.dumps({**machine(), "bench": "sweep", "torch_threads": torch.get_num_threads(),
                            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    for n, p in enumerate(todo, 1):
        print(f"[{n}/{len(todo)}] {p['key']}", file=sys.stderr)
        record = run_point(p, args)
        with args.results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({k: record[k] for k in ("key", "shape", "params", "val_bpb", "tokens_seen", "epochs")}),
              flush=True)
    return report(read_results(args.results), args)


if __name__ == "__main__":
    main()
