"""What several verbs' parsers share."""

from __future__ import annotations

import argparse

MODEL_HELP = "llmkit run folder, Hugging Face folder, .gguf file or built-in name (see `llmkit models`)"


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device and --dtype for verbs that run a model for inference."""
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 weights")
