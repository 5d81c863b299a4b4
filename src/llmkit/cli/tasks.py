"""CLI verbs for downstream tasks: `llmkit classify`, `embed`, `search` (registered by cli/main.py)."""

from __future__ import annotations

import argparse
import json

from llmkit.cli.common import MODEL_HELP, int_at_least
from llmkit.errors import LLMKitError


def cmd_classify(args: argparse.Namespace) -> None:
    from llmkit.data.readers import read_texts
    from llmkit.tasks.classify import load_classifier

    if bool(args.text) == bool(args.file):
        raise LLMKitError("give the texts with --text TEXT (repeatable) or --file FILE, not both")
    texts = args.text or read_texts(args.file, args.text_field)
    if any(not t.strip() for t in texts):
        raise LLMKitError("--text: empty text")
    clf = load_classifier(args.model)
    for text, r in zip(texts, clf.predict(texts, batch_size=args.batch_size)):
        if args.json:
            print(json.dumps({"text": text, **r}))
        else:
            print(f"{r['label']}\t{r['probability']:.4f}\t{text}")


def cmd_eval_classify(args: argparse.Namespace) -> None:
    """`llmkit eval --task classify` (chosen by itself for a classifier run): score it on a labelled set."""
    from llmkit.tasks.classify import evaluate_classifier_on, load_classifier

    clf = load_classifier(args.model, device=args.device)
    res = evaluate_classifier_on(clf, args.data, part=args.split or "test", batch_size=args.batch_size)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['data']} ({res['split']}, {res['n_test']:,} texts): accuracy {res['accuracy']:.4f}  "
              f"macro-F1 {res['macro_f1']:.4f}")


def cmd_embed(args: argparse.Namespace) -> None:
    import numpy as np

    from llmkit.data.readers import read_texts
    from llmkit.tasks.embed import SentenceEncoder

    if bool(args.text) == bool(args.file):
        raise LLMKitError("give the texts with --text TEXT (repeatable) or --file FILE, not both")
    texts = args.text or read_texts(args.file, args.text_field)
    emb = SentenceEncoder(args.model, max_length=args.max_length).encode(texts, batch_size=args.batch_size)
    if args.out:
        np.save(args.out, emb)
        print(f"{emb.shape[0]} embeddings of dimension {emb.shape[1]} written to {args.out}")
        return
    for text, e in zip(texts, emb):
        print(json.dumps({"text": text, "embedding": [round(float(v), 6) for v in e]}))


def cmd_search(args: argparse.Namespace) -> None:
    from llmkit.data.readers import read_texts
    from llmkit.tasks.embed import SentenceEncoder, search

    corpus = read_texts(args.corpus, args.text_field)
    enc = SentenceEncoder(args.model, max_length=args.max_length)
    for query, hits in zip(args.query, search(enc, corpus, args.query, top_k=args.top_k)):
        if args.json:
            print(json.dumps({"query": query, "hits": hits}))
            continue
        print(f"query: {query}")
        for h in hits:
            print(f"  {h['rank']:>2}. {h['score']:.4f}  {h['text']}")


# --------------------------------------------------------------------------------------------- parser


def register(sub: argparse._SubParsersAction) -> None:
    cl = sub.add_parser("classify", help="label texts with a fine-tuned classifier",
                        description="Print one line per text: label, probability, text (or JSON with --json).")
    cl.add_argument("--model", required=True, help="run folder from `llmkit finetune --task classify`")
    cl.add_argument("--text", action="append", help="a text to classify (repeatable)")
    cl.add_argument("--file", help="texts: one per line, or the text column of a .csv/.tsv/.jsonl file")
    cl.add_argument("--text-field", default="text", help="column/key holding the text in --file")
    cl.add_argument("--batch-size", type=int_at_least(1), default=64, help="texts per forward pass")
    cl.add_argument("--json", action="store_true", help="one JSON object per text (label, probability, ...)")
    cl.set_defaults(fn=cmd_classify)

    em = sub.add_parser("embed", help="sentence embeddings (mean pooling + L2 normalisation)",
                        description="Embed texts the sentence-transformers way; JSON lines, or a .npy with --out.")
    em.add_argument("--model", default="all-minilm-l6-v2", help=MODEL_HELP)
    em.add_argument("--text", action="append", help="a text to embed (repeatable)")
    em.add_argument("--file", help="texts: one per line, or the text column of a .csv/.tsv/.jsonl file")
    em.add_argument("--text-field", default="text", help="column/key holding the text in --file")
    em.add_argument("--out", help="write an (N, dim) float32 .npy instead of JSON lines")
    em.add_argument("--max-length", type=int_at_least(4), default=256, help="longest text in tokens (the rest is cut)")
    em.add_argument("--batch-size", type=int_at_least(1), default=64, help="texts per forward pass")
    em.set_defaults(fn=cmd_embed)

    se = sub.add_parser("search", help="semantic search: the corpus passages closest to a query",
                        description="Rank a corpus (one passage per line, or a .csv/.tsv/.jsonl text column) by "
                                    "cosine similarity of sentence embeddings to each query.")
    se.add_argument("--model", default="all-minilm-l6-v2", help=MODEL_HELP)
    se.add_argument("--corpus", required=True, help="passages: one per line, or a .csv/.tsv/.jsonl file")
    se.add_argument("--query", action="append", required=True, help="query text (repeatable)")
    se.add_argument("--top-k", type=int_at_least(1), default=5, help="passages to show per query")
    se.add_argument("--text-field", default="text", help="column/key holding the text in --corpus")
    se.add_argument("--max-length", type=int_at_least(4), default=256, help="longest text in tokens (the rest is cut)")
    se.add_argument("--json", action="store_true", help="one JSON object per query")
    se.set_defaults(fn=cmd_search)
