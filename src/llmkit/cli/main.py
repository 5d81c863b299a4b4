"""`llmkit <verb>`: one entry point; each group of verbs registers its parser from its own module.

Any `LLMKitError` (bad value, missing file, empty corpus, unknown key) is printed as one `error: ...` line with
exit status 2: users see what to fix, never a traceback. So is an `OSError` from the file system (a folder that
is not writable, a full disk, a file where a folder should be), with the path it was about: those are the
user's to fix too, and they can come from any verb that writes. Nothing broader is caught here: any other
exception is a bug, and its traceback is what a bug report needs.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from llmkit.cli import baselines, compress, data, explain, federated, infer, models, serve, tasks, train
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
    serve.register(sub)  # serve
    explain.register(sub)  # explain
    federated.register(sub)  # federated
    compress.register(sub)  # quantize, prune, compare
    baselines.register(sub)  # ngram
    return p


def os_error_line(e: OSError) -> str:
    """`cannot write runs/x/config.yaml: Permission denied`: what failed, on which path, and why, on one line."""
    path = e.filename
    why = e.strerror or str(e)
    if path is None:
        return why
    if e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EEXIST):
        verb = "write"
    elif e.errno in (errno.EACCES, errno.EPERM):
        verb = "read" if os.path.exists(path) and not os.access(path, os.R_OK) else "write"
    else:
        verb = "use"
    target = f" -> {e.filename2}" if e.filename2 else ""
    return f"cannot {verb} {path}{target}: {why}"


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
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
