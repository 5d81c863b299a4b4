"""Knowledge distillation from SmolLM2-135M-Instruct into a ~19 M student, against the same student from scratch.

Every run gets the same wall-clock budget of student training (`--minutes`, through train.max_minutes) on the
same token shards, with the same batches and the same held-out validation windows. The teacher's top-k logits
are computed once before the timed runs (`--prefill K`, its minutes printed: the one-off cost, like tokenizing,
shared by every divergence of the sweep); `--prefill 0` puts the teacher's forward passes inside every distilled
run's budget instead. Printed as JSON lines:

- `teacher-cache`: windows filled and the minutes it took;
- `run`: one line per training run (scratch, then one per divergence:temperature of the sweep): steps, tokens,
  held-out perplexity (the fixed validation windows the loop scores; lower is better), the curve's points;
- `speed`: optimiser steps/s with the teacher on the fly vs from the top-k cache (cold: first sight, the teacher
  runs and the cache is written; warm: every window read back), same steps, same batches, measured in one process;
- `summary`: which divergence and temperature won, and distilled vs scratch perplexity.
The curves (validation perplexity against wall-clock seconds) of scratch and every distilled run go in one PNG.

    python bench/distill.py --minutes 10 [--sweep forward_kl:2,reverse_kl:2,jsd:2,forward_kl:1,forward_kl:4]
        [--data data/shakespeare4-smollm2] [--out runs/bench-distill] [--speed-steps 8]

The data: four plays (`--plays`; about 110 k training tokens, so a CPU fills the teacher cache in minutes and
a 10-minute run sees each window several times) prepared with SmolLM2's tokenizer (the script makes both under
data/ when they are missing); the validation windows are the 10 % of each play `llmkit prepare` holds out.
Timings taken on a shared machine are noisy: compare figures of one run. The
time budget first times 6 steps, an evaluation and a checkpoint: a budget that only fits those (a very slow or
busy machine) ends every run after its 6 probe steps, an equal-steps rather than equal-time comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from llmkit.config import DistillRunConfig, RunConfig, build
from llmkit.data.shards import prepare
from llmkit.plots import pyplot, save_figure
from llmkit.train.distill import distill, fill_cache
from llmkit.train.pretrain import pretrain

TEACHER = "smollm2-135m-instruct"
PLAYS = "comedy_of_errors_gut,macbeth_gut,midsummer_nights_dream_gut,tempest_gut"


def ensure_data(data: Path, plays: str) -> None:
    """SmolLM2's tokenizer saved from the built-in model, and Shakespeare (all of it, or the `--plays` named)
    prepared with it (once)."""
    if (data / "meta.json").is_file():
        return
    from llmkit.data.corpora import corpus_documents
    from llmkit.infer.load import load_model

    tok = data.parent / "smollm2-tokenizer"
    if not (tok / "tokenizer.json").is_file():
        load_model(TEACHER).tokenizer.save(tok)
    source = "shakespeare"
    if plays:
        wanted, source = set(plays.split(",")), str(data) + "-text"
        Path(source).mkdir(parents=True, exist_ok=True)
        for name, text in corpus_documents("shakespeare"):
            if name in wanted:
                (Path(source) / f"{name}.txt").write_text(text, encoding="utf-8")
    prepare(source, tok, data, quiet=True)


def sections(args: argparse.Namespace) -> dict[str, Any]:
    """The model, data and train sections every run shares: only the objective differs."""
    return {"model": {"preset": args.student, "block_size": args.block_size},
            "data": {"path": str(args.data), "batch_size": args.batch_size},
            "train": {"max_steps": 100_000, "max_minutes": args.minutes, "lr": args.lr, "warmup_steps": args.warmup,
                      "eval_interval": args.eval_interval, "eval_iters": args.eval_iters, "log_interval": 5,
                      "select_metric": "val_perplexity", "dtype": args.dtype, "seed": 1337}}


def curve(run: Path) -> list[tuple[float, float]]:
    """(elapsed seconds, validation perplexity) at every evaluation of a run."""
    points, elapsed = [], 0.0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        elapsed = rec.get("elapsed_s", elapsed)
        if "val_perplexity" in rec:
            points.append((elapsed, rec["val_perplexity"]))
    return points


def record(name: str, run: Path, result: Any, tokens_per_step: int, **extra: Any) -> dict[str, Any]:
    points = curve(run)
    return {"bench": "run", "name": name, **extra, "steps": result.step, "tokens": result.step * tokens_per_step,
            "val_perplexity": round(points[-1][1], 3), "best_val_perplexity": round(min(p for _, p in points), 3),
            "curve": [(round(t, 1), round(p, 3)) for t, p in points]}


def speed(args: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any]:
    """Steps/s of the same `--speed-steps` steps: on the fly, cache cold (first pass), cache warm (second pass)."""
    out: dict[str, Any] = {"bench": "speed", "steps": args.speed_steps, "top_k": args.top_k}
    cache = args.out / "speed-cache"
    shutil.rmtree(cache, ignore_errors=True)
    for name, k in (("on_the_fly", 0), ("cache_cold", args.top_k), ("cache_warm", args.top_k)):
        values = {**base, "kd": {"teacher": TEACHER, "cache_top_k": k, "cache_dir": str(cache)}}
        values["train"] = {**base["train"], "max_minutes": 0, "max_steps": args.speed_steps, "eval_interval": 0,
                           "eval_iters": 1}
        cfg = build(DistillRunConfig, values)
        run = args.out / f"speed-{name}"
        with contextlib.redirect_stdout(sys.stderr):
            distill(cfg, run, quiet=True, overwrite=True)
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        timed = {r["step"]: r["elapsed_s"] for r in logged if "elapsed_s" in r}  # steps 1 and the last
        first, last = min(timed), max(timed)  # the first step (allocator warm-up) is left out
        out[f"{name}_steps_per_s"] = round((last - first) / (timed[last] - timed[first]), 4)
    out["cache_mib"] = round(sum(f.stat().st_blocks * 512 for f in cache.iterdir()) / 2**20, 1)
    out["faster"] = max(("on_the_fly", "cache_warm"), key=lambda n: out[f"{n}_steps_per_s"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget of every run")
    p.add_argument("--sweep", default="forward_kl:2,reverse_kl:2,jsd:2,forward_kl:1,forward_kl:4",
                   help="divergence:temperature pairs to distil with")
    p.add_argument("--alpha", type=float, default=0.5, help="kd.alpha of every distilled run")
    p.add_argument("--student", default="smollm2-draft", help="student model preset")
    p.add_argument("--data", type=Path, default=Path("data/shakespeare4-smollm2"), help="token shards (SmolLM2's "
                   "tokenizer); made when missing")
    p.add_argument("--plays", default=PLAYS, help="the plays --data is made of when missing (comma-separated; "
                   "empty = all of Shakespeare)")
    p.add_argument("--prefill", type=int, default=64, help="fill a top-k teacher cache of this k once, before the "
                   "timed runs, which then read it (its time is reported, not inside their budget; 0 = the "
                   "teacher runs inside every distilled run's budget, on the fly)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-distill"), help="folder for the runs and the PNG")
    p.add_argument("--block-size", type=int, default=256, help="training window (tokens)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=20, help="warmup steps")
    p.add_argument("--eval-interval", type=int, default=25, help="steps between validation evaluations")
    p.add_argument("--eval-iters", type=int, default=8, help="validation batches (fixed held-out windows)")
    p.add_argument("--dtype", default="float32", help="train.dtype of the student")
    p.add_argument("--top-k", type=int, default=64, help="kd.cache_top_k of the speed measurement")
    p.add_argument("--speed-steps", type=int, default=8, help="steps per speed measurement, at least 3 (0 = skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = PyTorch's default)")
    args = p.parse_args()
    if 0 < args.speed_steps < 3:
        p.error("--speed-steps: at least 3 (the first step is warm-up; steps/s is timed between two later ones)")
    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_data(args.data, args.plays)
    args.out.mkdir(parents=True, exist_ok=True)
    base = sections(args)
    tokens_per_step = args.batch_size * args.block_size
    runs: list[dict[str, Any]] = []

    scratch = args.out / "scratch"
    with contextlib.redirect_stdout(sys.stderr):  # the loop's evaluation lines: stdout is JSON only
        res = pretrain(build(RunConfig, base), scratch, quiet=True, overwrite=True)
    runs.append(record("scratch", scratch, res, tokens_per_step))
    print(json.dumps(runs[-1]), flush=True)
    cached: dict[str, Any] = {}
    if args.prefill:
        cached = {"cache_top_k": args.prefill, "cache_dir": str(args.out / "teacher-cache")}
        with contextlib.redirect_stdout(sys.stderr):
            fill = fill_cache(build(DistillRunConfig, {**base, "kd": {"teacher": TEACHER, **cached}}))
        print(json.dumps({"bench": "teacher-cache", "top_k": args.prefill, **fill,
                          "minutes": round(fill["seconds"] / 60, 2)}), flush=True)
    for item in args.sweep.split(","):
        loss, temp = item.split(":")
        run = args.out / f"kd-{loss}-T{temp}"
        cfg = build(DistillRunConfig, {**base, "kd": {"teacher": TEACHER, "loss": loss, "temperature": float(temp),
                                                      "alpha": args.alpha, **cached}})
        with contextlib.redirect_stdout(sys.stderr):
            res = distill(cfg, run, quiet=True, overwrite=True)
        runs.append(record(f"{loss}:T={temp}", run, res, tokens_per_step, loss=loss, temperature=float(temp),
                           alpha=args.alpha))
        print(json.dumps(runs[-1]), flush=True)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for r in runs:
        t, ppl = zip(*r["curve"])
        ax.plot(t, ppl, "o-" if r["name"] == "scratch" else ".-", lw=2 if r["name"] == "scratch" else 1,
                label=f"{r['name']} ({r['val_perplexity']:.1f} after {r['steps']} steps)")
    ax.set_yscale("log")
    ax.set_xlabel("wall-clock seconds of training")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{args.student} on Shakespeare, {args.minutes:g} min each:\ndistilled from {TEACHER} vs scratch")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, args.out / "distill_vs_scratch.png")

    if args.speed_steps:
        print(json.dumps(speed(args, base)), flush=True)
    best = min(runs[1:], key=lambda r: r["val_perplexity"])
    print(json.dumps({"bench": "summary", "minutes": args.minutes, "scratch_val_perplexity": runs[0]["val_perplexity"],
                      "best_distilled": best["name"], "distilled_val_perplexity": best["val_perplexity"],
                      "distilled_wins": best["val_perplexity"] < runs[0]["val_perplexity"],
                      "png": str(args.out / "distill_vs_scratch.png")}), flush=True)


if __name__ == "__main__":
    main()
