"""`llmkit ngram`: the Kneser–Ney n-gram baseline on token shards, scored in bits per byte like `llmkit eval`."""

from __future__ import annotations

import argparse
import json

from llmkit.cli.common import int_at_least


def cmd_ngram(args: argparse.Namespace) -> None:
    from llmkit.baselines.ngram import fit_and_score

    for order in args.order or [5]:
        res = fit_and_score(args.data, order, split=args.split, max_train_tokens=args.max_train_tokens)
        if args.json:
            print(json.dumps(res))
        else:
            print(f"{res['data']}: {order}-gram (interpolated modified Kneser-Ney, {res['train_tokens']:,} train "
                  f"tokens): loss {res['loss']:.4f}  perplexity {res['perplexity']:.2f}  bits/byte "
                  f"{res['bits_per_byte']:.4f}  (fit {res['fit_seconds']:.1f}s, score {res['score_seconds']:.1f}s)")


def register(sub: argparse._SubParsersAction) -> None:
    n = sub.add_parser("ngram", help="fit and score a Kneser-Ney n-gram language model on token shards (a baseline)",
                       description="Count n-grams of the train split of a prepared data folder (`llmkit prepare`), "
                       "smooth them with interpolated modified Kneser-Ney (Chen & Goodman), and score a held-out "
                       "split in loss, perplexity and bits per byte, the same figures and denominator as `llmkit "
                       "eval` on the same folder. Fits 1.5 M tokens at order 5 in seconds (numpy; see "
                       "llmkit/baselines/ngram.py for why not KenLM or nltk).")
    n.add_argument("--data", required=True, help="prepared data folder (train.bin, val.bin, meta.json)")
    n.add_argument("--order", type=int_at_least(1), action="append", metavar="N",
                   help="n-gram order: 1 = unigram ... (repeatable: --order 3 --order 5; default 5)")
    n.add_argument("--split", default="val", help="split to score (default val)")
    n.add_argument("--max-train-tokens", type=int_at_least(0), default=0, metavar="N",
                   help="fit on the first N train tokens only (0 = all, the default)")
    n.add_argument("--json", action="store_true", help="one JSON object per order")
    n.set_defaults(fn=cmd_ngram)
