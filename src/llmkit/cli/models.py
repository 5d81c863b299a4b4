"""CLI verbs for model files: `llmkit convert` and `llmkit models` (registered by cli/main.py)."""

from __future__ import annotations

import argparse
import json

from llmkit.cli.common import MODEL_HELP


def cmd_convert(args: argparse.Namespace) -> None:
    from llmkit.interop.convert import convert

    out = convert(args.inp, args.out, to=args.to, dtype=args.dtype, quant=args.quant)
    if args.to == "gguf":
        print(f"{args.inp} -> GGUF {args.quant or 'f16'} file {out} ({out.stat().st_size / 1e6:.1f} MB)")
        return
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
    cv = sub.add_parser("convert", help="import Hugging Face / GGUF weights or export to Hugging Face / GGUF",
                        description="Convert between formats. --to llmkit: an HF folder (config.json + "
                        "safetensors), a .gguf file or a built-in name becomes an llmkit run folder. --to hf: an "
                        "llmkit run folder (or any of those) becomes an HF folder that transformers loads. --to "
                        "gguf: a gpt2 or llama decoder becomes one .gguf file llama.cpp runs (--quant f16, q8_0, "
                        "q4_0), tokenizer and chat template included.")
    cv.add_argument("--in", dest="inp", required=True, help="source: " + MODEL_HELP)
    cv.add_argument("--out", required=True, help="folder to write: new, empty, or a model folder llmkit wrote "
                    "(replaced atomically); a folder holding anything else is refused. --to gguf: a FILE.gguf")
    cv.add_argument("--to", required=True, choices=["llmkit", "hf", "gguf"], help="target format")
    cv.add_argument("--dtype", help="store weights as float32 or bfloat16 (default: as the source has them; "
                    "--to llmkit | hf)")
    cv.add_argument("--quant", choices=["f16", "q8_0", "q4_0"], help="--to gguf: tensor type of the matrices, "
                    "llama.cpp's f16 (default), q8_0 (8.5 bits/weight) or q4_0 (4.5 bits/weight; the output head "
                    "q8_0); norms and biases stay f32")
    cv.set_defaults(fn=cmd_convert)

    ms = sub.add_parser("models", help="list the built-in pretrained models and where they come from")
    ms.add_argument("--json", action="store_true", help="print a JSON list")
    ms.set_defaults(fn=cmd_models)
