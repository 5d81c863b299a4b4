"""CLI verbs for text and tokens: `llmkit tokenizer train`, `llmkit prepare`."""

from __future__ import annotations

import argparse

from llmkit.cli.common import int_at_least


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from llmkit.data.shards import iter_texts
    from llmkit.data.tokenizer import Tokenizer

    if args.kind == "gpt2":
        tok = Tokenizer.gpt2()
    elif args.kind == "wordpiece":
        from llmkit.data.wordpiece import train_wordpiece

        tok = train_wordpiece(iter_texts(args.corpus, args.text_field), args.vocab_size)
    else:
        texts = iter_texts(args.corpus, args.text_field)
        tok = Tokenizer.train_char(texts) if args.kind == "char" else Tokenizer.train_bpe(texts, args.vocab_size)
    out = tok.save(args.out)
    print(f"{args.kind} tokenizer with {tok.vocab_size:,} tokens written to {out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from llmkit.data.shards import prepare

    meta = prepare(args.corpus, args.tokenizer, args.out, val_fraction=args.val_fraction,
                   text_field=args.text_field, quiet=args.quiet)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    print(f"{meta['documents']} documents -> {tr['tokens']:,} train / {va['tokens']:,} val tokens "
          f"({(tr['bytes'] + va['bytes']) / max(1, tr['tokens'] + va['tokens']):.2f} bytes per token) in {args.out}")



def register(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="train or export a tokenizer")
    tsub = tok.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a byte-level BPE or char tokenizer, or write GPT-2's",
                        description="Train a tokenizer on a corpus and write tokenizer.json (+ config) to --out.")
    t.add_argument("--corpus", default="shakespeare", help="built-in corpus name, text file, folder or JSONL")
    t.add_argument("--kind", choices=["bpe", "char", "gpt2", "wordpiece"], default="bpe",
                   help="bpe: byte-level BPE; char: one token per character; gpt2: the real GPT-2 vocabulary; "
                        "wordpiece: BERT's (lowercased, [CLS]/[SEP]/[MASK]) for encoders")
    t.add_argument("--vocab-size", type=int_at_least(1), default=4096,
                   help="BPE vocabulary size, special tokens included")
    t.add_argument("--text-field", default="text", help="JSONL field holding the text")
    t.add_argument("--out", required=True, help="folder to write")
    t.set_defaults(fn=cmd_tokenizer_train)

    pr = sub.add_parser("prepare", help="tokenize a corpus into train/val token shards",
                        description="Stream a corpus through a tokenizer into train.bin / val.bin + meta.json.")
    pr.add_argument("--corpus", default="shakespeare", help="built-in corpus name, text file, folder or JSONL")
    pr.add_argument("--tokenizer", required=True, help="tokenizer folder (from `llmkit tokenizer train`)")
    pr.add_argument("--out", required=True, help="folder for the shards")
    pr.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out for validation")
    pr.add_argument("--text-field", default="text", help="JSONL field holding the text")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(fn=cmd_prepare)
