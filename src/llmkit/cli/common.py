"""What several verbs' parsers share."""

from __future__ import annotations

import argparse
from collections.abc import Callable

MODEL_HELP = "llmkit run folder, Hugging Face folder, .gguf file or built-in name (see `llmkit models`)"


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device and --dtype for verbs that run a model for inference."""
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 weights")


def int_at_least(minimum: int = 1) -> Callable[[str], int]:
    """argparse `type=` for a count: an integer from `minimum` to 2**31 - 1. argparse turns the refusal into its
    own one-line usage error (exit 2), before any model is loaded; the upper bound keeps a typo from reaching
    code that sizes arrays by it."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not minimum <= value < 2**31:
            raise argparse.ArgumentTypeError(f"must be an integer from {minimum} to {2**31 - 1:,}, got {text}")
        return value

    return parse
