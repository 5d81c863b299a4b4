"""CLI verbs for model files: `llmkit convert` and `llmkit models` (registered by cli/main.py)."""

from __future__ import annotations

import argparse
import json

from llmkit.cli.common import MODEL_HELP


def cmd_convert(args: argparse.Namespace) -> None:
    from llmkit.interop.convert import convert

    out = convert(args.inp, args.out, to=args.to, dtype=args.dtype)
    what = "llmkit run folder" if args.to == "llmkit" else "Hugging Face folder"
    print(f"{args.inp} -> {what} {out}")


def cmd_models(args: argparse.Namespace) -> None:
    from llmkit.interop.registry import cache_root, list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows))
        return
    for r in rows:
        where = r["source"] if r["installed"] else f"not installed ({r['install']})"
        cached = f"\n    cached: {r['cached']}" if r.get("cached") else ""
        print(f"{r['name']}  [{r['kind']}, {r['format']}]  {r['description']}\n    from: {where}{cached}")
    print(f"converted models are cached in {cache_root() / 'models'} (set LLMKIT_HOME to move it)")


def register(sub: argparse._SubParsersAction) -> None:
    cv = sub.add_parser("convert", help="import Hugging Face / GGUF weights or export to Hugging Face",
                        description="Convert between formats. --to llmkit: an HF folder (config.json + "
                        "safetensors), a .gguf file or a built-in name becomes an llmkit run folder. --to hf: an "
                        "llmkit run folder (or any of those) becomes an HF folder that transformers loads.")
    cv.add_argument("--in", dest="inp", required=True, help="source: " + MODEL_HELP)
    cv.add_argument("--out", required=True, help="folder to write: new, empty, or a model folder llmkit wrote "
                    "(replaced atomically); a folder holding anything else is refused")
    cv.add_argument("--to", required=True, choices=["llmkit", "hf"], help="target format")
    cv.add_argument("--dtype", help="store weights as float32 or bfloat16 (default: as the source has them)")
    cv.set_defaults(fn=cmd_convert)

    ms = sub.add_parser("models", help="list the built-in pretrained models and where they come from")
    ms.add_argument("--json", action="store_true", help="print a JSON list")
    ms.set_defaults(fn=cmd_models)
