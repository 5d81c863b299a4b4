"""kill -9 at any moment loses nothing: random SIGKILLs against a real `llmkit pretrain`, resumed each time.

A tiny Llama trains on CPU in fp32 with one thread (so every run is bit-reproducible), checkpointing every few
steps and evaluating now and then. Each round starts `python -m llmkit.cli.main pretrain` (`--resume` once a
checkpoint exists, `--overwrite` before that) and SIGKILLs it at a random moment: mostly while it trains,
evaluates or writes a checkpoint, sometimes while it is still starting. `LLMKIT_FAULT_SLOW_WRITE_S` (read by
llmkit.train.checkpoint) makes checkpoint writes slow, so that many kills land inside one. When the run has
taken --kills kills it is left to finish, and its final model.safetensors, last checkpoint and loss curve are
compared with an uninterrupted run of the same config; if a run finishes before that, another one starts (in
the same folder, with --overwrite) and is compared too.

Prints one JSON object: rounds, kills, kills during a checkpoint write (a temporary checkpoint folder was left
by the kill), kills during an evaluation (the last record was the training line of an evaluation step), kills
during start-up (before the round trained a step), failed resumes (must be 0), steps lost per kill (completed
steps the next round had to redo; at most the checkpoint interval), max |Δweight| (must be 0.0), wall time.

    python bench/faults.py [--kills 100] [--seed 0] [--steps 300] [--data TOKEN_SHARD_DIR] [--verbose]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file

from llmkit.data.corpora import corpus_documents
from llmkit.data.shards import prepare
from llmkit.data.tokenizer import Tokenizer
from llmkit.train.checkpoint import SLOW_WRITE_ENV, checkpoint_step, latest_checkpoint

SAVE_INTERVAL = 10
EVAL_INTERVAL = 30
SLOW_WRITE_S = 0.15  # per pause; a checkpoint write holds three of them
STARTUP_KILLS = 0.1  # share of kills aimed at start-up (import, clean-up, metrics truncation, model build)


def make_data(root: Path) -> Path:
    """Token shards from the first 300 k characters of the built-in Shakespeare, with a 512-token BPE."""
    text = "".join(t for _, t in corpus_documents("shakespeare"))[:300_000]
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    tok = Tokenizer.train_bpe([text], vocab_size=512).save(root / "tokenizer")
    prepare(str(root / "corpus.txt"), tok, root / "data", quiet=True)
    return root / "data"


def run_config(data: Path, steps: int, seed: int) -> dict[str, Any]:
    return {"model": {"arch": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "block_size": 64,
                      "bias": False, "tie_embeddings": False, "dropout": 0.1},  # dropout: the RNG must resume too
            "data": {"path": str(data), "batch_size": 8, "seed": seed},
            "train": {"max_steps": steps, "warmup_steps": 10, "lr": 3e-3, "eval_interval": EVAL_INTERVAL,
                      "eval_iters": 8, "save_interval": SAVE_INTERVAL, "log_interval": 1, "dtype": "float32",
                      "device": "cpu", "threads": 1, "seed": seed}}


def records(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as records, skipping a last line a kill cut short."""
    path = run / "metrics.jsonl"
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def curve(run: Path) -> list[tuple]:
    """(step, training loss, validation loss) of every logged step and evaluation."""
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in records(run) if {"loss", "val_loss"} & r.keys()]


def stamp(path: Path) -> tuple[int, int, int] | None:
    """Identity of a file's current content: any append or rewrite changes it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def start(cfg_file: Path, run: Path, resume: bool, env: dict[str, str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llmkit.cli.main", "pretrain", "--config", str(cfg_file), "--out", str(run),
           "--quiet", "--train.threads", "1", "--resume" if resume else "--overwrite"]
    with log.open("w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)


def wait_for_training(proc: subprocess.Popen, metrics: Path, before: tuple | None, done: int, timeout: float) -> bool:
    """Block until the round has logged a step past `done` (True) or ended (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        now = stamp(metrics)
        if now is not None and now != before and any(r["step"] > done for r in records(metrics.parent)):
            return True
        time.sleep(0.02)
    return proc.poll() is None


def compare(ref: Path, run: Path) -> tuple[float, bool]:
    """max |Δweight| over the final weights and the last checkpoint; whether the loss curves are identical."""
    worst = 0.0
    for a, b in ((ref / "model.safetensors", run / "model.safetensors"),
                 (latest_checkpoint(ref) / "model.safetensors", latest_checkpoint(run) / "model.safetensors")):
        ta, tb = load_file(str(a)), load_file(str(b))
        if ta.keys() != tb.keys():
            return float("inf"), False
        worst = max([worst, *((ta[k].double() - tb[k].double()).abs().max().item() for k in ta)])
    return worst, curve(ref) == curve(run)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300, help="training steps of the run")
    ap.add_argument("--data", type=Path, help="token shards to train on (default: made here from Shakespeare)")
    ap.add_argument("--verbose", action="store_true", help="one line per round on stderr")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="llmkit-faults-"))
    data = args.data or make_data(tmp)
    cfg_file = tmp / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(run_config(data, args.steps, args.seed)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    ref, run = tmp / "reference", tmp / "run"
    t = time.perf_counter()
    proc = start(cfg_file, ref, False, env, tmp / "reference.log")
    wait_for_training(proc, ref / "metrics.jsonl", None, 0, 600)
    startup_s = time.perf_counter() - t
    if proc.wait() != 0:
        raise SystemExit(f"the uninterrupted run failed: {(tmp / 'reference.log').read_text()[-2000:]}")
    step_s = (time.perf_counter() - t - startup_s) / args.steps + 3 * SLOW_WRITE_S / SAVE_INTERVAL
    window_s = 2 * SAVE_INTERVAL * step_s  # a round trains ~one checkpoint interval on average

    env[SLOW_WRITE_ENV] = str(SLOW_WRITE_S)
    out: dict[str, Any] = {"rounds": 0, "kills": 0, "kills_during_checkpoint_write": 0, "kills_during_eval": 0,
                           "kills_during_startup": 0, "failed_resumes": 0, "runs_completed": 0,
                           "latest_dangling": 0, "loss_curves_identical": True}
    lost: list[int] = []
    failures: list[str] = []
    worst = 0.0
    resume_from: int | None = None  # None: no checkpoint yet, the next round starts the run afresh
    while True:
        metrics, ck = run / "metrics.jsonl", run / "checkpoints"
        before = stamp(metrics)
        temps_before = set(ck.glob(".step_*"))  # a start-up kill may leave an earlier kill's temp folder
        log = tmp / "round.log"
        proc = start(cfg_file, run, resume_from is not None, env, log)
        out["rounds"] += 1
        if out["kills"] < args.kills:
            if rng.random() < STARTUP_KILLS:
                time.sleep(rng.uniform(0, startup_s))
            elif wait_for_training(proc, metrics, before, resume_from or 0, 600):
                time.sleep(rng.uniform(0, window_s))
        if proc.poll() is None and out["kills"] < args.kills:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            out["kills"] += 1
            out["kills_during_checkpoint_write"] += bool(set(ck.glob(".step_*")) - temps_before)
            recs = records(run) if stamp(metrics) != before else []
            if not recs or recs[-1]["step"] <= (resume_from or 0):
                out["kills_during_startup"] += 1
            elif "loss" in recs[-1] and (recs[-1]["step"] % EVAL_INTERVAL == 0 or recs[-1]["step"] == args.steps):
                out["kills_during_eval"] += 1
            reached = max([resume_from or 0, *(r["step"] for r in recs)])
            pointer = ck / "latest"
            if pointer.is_file() and not (ck / pointer.read_text().strip()).is_dir():
                out["latest_dangling"] += 1
            latest = latest_checkpoint(run)
            resume_from = None if latest is None else checkpoint_step(latest)
            lost.append(reached - (resume_from or 0))
            if args.verbose:
                print(f"round {out['rounds']}: killed at step {reached}, resumes from {resume_from}", file=sys.stderr)
            continue
        if proc.wait() != 0:
            out["failed_resumes"] += 1
            failures.append(log.read_text()[-600:])
            if len(failures) >= 3:
                break
            continue
        out["runs_completed"] += 1
        diff, same = compare(ref, run)
        worst = max(worst, diff)
        out["loss_curves_identical"] &= same
        if out["kills"] >= args.kills:
            break
        resume_from = None  # killed fewer times than asked: run again from scratch in the same folder
    out.update(steps=args.steps, checkpoint_interval=SAVE_INTERVAL,
               steps_lost_max=max(lost, default=0), steps_lost_mean=round(sum(lost) / max(1, len(lost)), 2),
               max_abs_dweight=worst if out["runs_completed"] else None, wall_s=round(time.perf_counter() - t0, 1))
    if failures:
        out["failures"] = failures
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
