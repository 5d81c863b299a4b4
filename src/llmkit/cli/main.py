"""`llmkit <verb>`: one entry point; each group of verbs registers its parser from its own module.

Any `LLMKitError` (bad value, missing file, empty corpus, unknown key) is printed as one `error: ...` line with
exit status 2: users see what to fix, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from llmkit.cli import data, infer, models, tasks, train
from llmkit.errors import LLMKitError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmkit", description="Make language models end to end: tokenizer, data, "
                                "pretraining, fine-tuning, generation, evaluation, conversion, chat.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    data.register(sub)  # tokenizer, prepare
    train.register(sub)  # pretrain, finetune
    infer.register(sub)  # generate, eval, chat
    models.register(sub)  # convert, models
    tasks.register(sub)  # classify, embed, search
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if getattr(args, "takes_extra", False):
            args.fn(args, extra)
        else:
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.fn(args)
    except LLMKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
