"""Pruning SmolLM2-135M-Instruct: 50 % unstructured (magnitude vs Wanda, the Wanda paper's table) and structured MLP
width removal with a short recovery fine-tune, scored by `llmkit compare` on a text none of the steps read.

Data, so the evaluation text stays held out from every compression step:
- evaluated on: Shakespeare's "A Lover's Complaint" (the text bench/smollm2_perplexity.py scores);
- calibration (Wanda, structured importance) and recovery: `llmkit prepare` shards of the other Shakespeare texts
  (the built-in corpus without that poem), tokenised with SmolLM2's tokenizer.
SmolLM2's own pretraining may have seen Shakespeare; no step here did.

The base is the built-in model written as an fp32 llmkit run folder, so every size is fp32 safetensors against fp32
safetensors. Decode speed is greedy batch-1 tokens/s, each model in the same process (ratios are what counts on a
shared machine). Prints one JSON line per model (compare's row + how it was made), after a header with the machine.

    python bench/prune.py [--out runs/prune-bench] [--mlp-sparsity 0.25] [--recover-steps 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from llmkit.compress.compare import compare
from llmkit.compress.prune import PruneSpec, prune_model
from llmkit.data.corpora import CORPORA, package_dir
from llmkit.data.shards import prepare
from llmkit.interop.convert import convert
from train_throughput import machine

HELD_OUT = "lovers_complaint_gut.txt"


def setup(root: Path) -> tuple[Path, Path, Path]:
    """(base run folder, prepared shards without the held-out poem, the held-out poem)."""
    package, hint, _ = CORPORA["shakespeare"]
    texts = package_dir(package, hint) / "texts"
    base, data, corpus = root / "base", root / "data", root / "corpus"
    if not (base / "model.safetensors").is_file():
        convert("smollm2-135m-instruct", base, to="llmkit", dtype="float32")
    if not (data / "meta.json").is_file():
        corpus.mkdir(parents=True, exist_ok=True)
        for f in sorted(texts.glob("*_gut.txt")):
            if f.name != HELD_OUT:
                shutil.copy(f, corpus / f.name)
        prepare(str(corpus), base / "tokenizer", data, quiet=True)
    return base, data, texts / HELD_OUT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/prune-bench", help="folder for the pruned models (reused if present)")
    ap.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity (magnitude, wanda)")
    ap.add_argument("--mlp-sparsity", default="0.25", help="structured MLP width removed, comma-separated list")
    ap.add_argument("--recover-steps", type=int, default=100, help="recovery steps after structured pruning")
    ap.add_argument("--recover-batch-size", type=int, default=8)
    ap.add_argument("--recover-seq-len", type=int, default=256)
    ap.add_argument("--recover-lr", type=float, default=1e-4)
    ap.add_argument("--calib-seqs", type=int, default=32, help="calibration windows (Wanda, structured)")
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens scored")
    ap.add_argument("--only", default="", help="comma-separated subset of: magnitude, wanda, structured")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.out)
    base, data, held_out = setup(root)
    print(json.dumps({**machine(), "bench": "prune", "held_out": str(held_out), "calibration_and_recovery": str(data),
                      "calib": f"{args.calib_seqs} x {args.calib_len} tokens"}), flush=True)
    only = set(filter(None, args.only.split(",")))
    runs: list[tuple[str, dict]] = []

    def make(name: str, spec: PruneSpec, **kw) -> None:
        out = root / name
        if not (out / "model.safetensors").is_file():
            t0 = time.perf_counter()
            report = prune_model(str(base), spec, out, device="cpu", quiet=True, **kw)
            report["seconds"] = round(time.perf_counter() - t0, 1)
            (root / f"{name}.json").write_text(json.dumps(report))
        runs.append((name, json.loads((root / f"{name}.json").read_text())))

    calib = dict(calib=str(data), calib_seqs=args.calib_seqs, calib_len=args.calib_len)
    for method in ("magnitude", "wanda"):
        if not only or method in only:
            make(f"{method}-{args.sparsity:g}", PruneSpec(method, args.sparsity, **calib))
    if not only or "structured" in only:
        for s in (float(x) for x in args.mlp_sparsity.split(",")):
            spec = PruneSpec("structured", s, parts=("mlp",), **calib)
            make(f"mlp-{s:g}", spec)
            if args.recover_steps:
                make(f"mlp-{s:g}-rec{args.recover_steps}", spec, recover_steps=args.recover_steps, data=str(data),
                     recover_lr=args.recover_lr, recover_batch_size=args.recover_batch_size,
                     recover_seq_len=args.recover_seq_len)
    rows = compare([str(base), *(str(root / n) for n, _ in runs)], held_out, max_tokens=args.max_tokens,
                   context=512, quiet=True)
    made = {str(root / n): r for n, r in runs}
    for row in rows:
        how = made.get(row["source"], {})
        keep = ("method", "sparsity", "pattern", "parts", "zero_fraction_layers", "zero_fraction_model",
                "intermediate_size", "params_before", "params_after", "calibration", "recovery", "seconds")
        print(json.dumps({"bench": "prune", **row, **{k: how[k] for k in keep if k in how}}), flush=True)


if __name__ == "__main__":
    main()
