"""The `--task text2text` half of `llmkit eval`: its flags and its command (cli/infer.py dispatches here).

Kept light to import (no torch): `llmkit --help` builds every parser."""

from __future__ import annotations

import argparse
import json

from llmkit.cli.common import int_at_least


def add_text2text_args(p: argparse.ArgumentParser) -> None:
    """The flags only --task text2text reads (lm ignores them)."""
    g = p.add_argument_group("--task text2text")
    g.add_argument("--beam", type=int, default=1, metavar="N",
                   help="beam size for encoder-decoders (1 = greedy, the default; decoders decode greedily)")
    g.add_argument("--length-penalty", type=float, default=1.0, metavar="A",
                   help="beam search: hypotheses are ranked by log-probability / length ** A (0 = raw "
                   "log-probability, > 0 favours longer outputs; default 1)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="most tokens per output (default: an encoder-decoder's whole decoder context, 256 for a "
                   "decoder); outputs that reach it are counted as `truncated` and warned about, never cut silently")
    g.add_argument("--limit", type=int_at_least(0), default=0, metavar="N",
                   help="evaluate the first N pairs of the split only (0 = all, the default)")
    g.add_argument("--predictions", metavar="FILE",
                   help="where every prediction goes, one JSON object per line (ref, source, reference, "
                   "prediction, finish_reason); default: predictions.jsonl in the --model folder")
    g.add_argument("--instruction", metavar="TEXT",
                   help="decoders: the instruction before each source in the chat prompt (default: the SFT run's "
                   "own, which must not be changed, else SFT's default \"Rewrite this verse in modern English:\")")


def cmd_eval_text2text(args: argparse.Namespace) -> None:
    from llmkit.text2text.evaluate import evaluate_text2text

    res = evaluate_text2text(args.model, args.data, split=args.split or "test", beam=args.beam,
                             max_new_tokens=args.max_new_tokens, limit=args.limit, predictions=args.predictions,
                             batch_size=args.batch_size, length_penalty=args.length_penalty,
                             instruction=args.instruction, device=args.device, dtype=args.dtype,
                             quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps(res, ensure_ascii=False))
        return
    print(f"{res['data']} ({res['split']}, {res['examples']:,} pairs), {res['kind']} {res['model']}: "
          f"BLEU {res['bleu']:.2f}  chrF++ {res['chrf']:.2f}  ROUGE-1 {res['rouge1']:.2f}  "
          f"ROUGE-2 {res['rouge2']:.2f}  "
          f"ROUGE-L {res['rougeL']:.2f}  ROUGE-Lsum {res['rougeLsum']:.2f}  exact match {res['exact_match']:.1%}")
    print(f"BLEU signature: {res['bleu_signature']}")
    print(f"chrF++ signature: {res['chrf_signature']}")
    print(f"predictions: {res['predictions']} ({res['truncated']} reached --max-new-tokens {res['max_new_tokens']})")
