"""Perplexity of SmolLM2-135M-Instruct on a Shakespeare text: `llmkit eval` vs transformers, same tokens, same run.

llmkit loads the built-in model (cached conversion of the packaged GGUF); transformers loads the same GGUF with
`gguf_file=`. Both score the same token ids in the same non-overlapping windows (llmkit's `evaluate_lm` windows:
`context` tokens each, every token predicted once), so the two perplexities must agree to float rounding.

    python bench/smollm2_perplexity.py [--data FILE] [--dtype float32] [--batch-size 1]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import llmkit
from llmkit.data.corpora import CORPORA, package_dir
from llmkit.infer.evaluate import evaluate_lm
from llmkit.interop.registry import builtin_source


def default_text() -> str:
    """A Lover's Complaint (14 KB): one whole Shakespeare poem, one 8k-token window."""
    package, hint, _ = CORPORA["shakespeare"]
    return str(package_dir(package, hint) / "texts" / "lovers_complaint_gut.txt")


@torch.inference_mode()
def hf_perplexity(model, tokens: np.ndarray, context: int) -> tuple[float, int]:
    """Mean next-token NLL over the same windows llmkit's evaluate_lm uses."""
    total, counted = 0.0, 0
    for s in range(0, len(tokens) - 1, context):
        w = torch.from_numpy(np.asarray(tokens[s:s + context + 1], dtype=np.int64))[None]  # (1, T+1)
        logits = model(w[:, :-1]).logits  # (1, T, V)
        total += float(F.cross_entropy(logits.float()[0], w[0, 1:], reduction="sum"))
        counted += w.shape[1] - 1
    return total / counted, counted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=default_text(), help="UTF-8 text file")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=1, help="llmkit windows per forward pass")
    args = ap.parse_args()
    import transformers

    t0 = time.perf_counter()
    lm = llmkit.load("smollm2-135m-instruct", device="cpu", dtype=args.dtype)
    ours = evaluate_lm(lm, args.data, batch_size=args.batch_size, quiet=True)
    t_ours = time.perf_counter() - t0
    print(json.dumps({"bench": "smollm2_perplexity", "impl": "llmkit", "dtype": args.dtype, "data": args.data,
                      "tokens": ours["tokens"], "context": ours["context"], "loss": round(ours["loss"], 6),
                      "perplexity": round(ours["perplexity"], 4), "seconds": round(t_ours, 1)}), flush=True)

    t0 = time.perf_counter()
    src = builtin_source("smollm2-135m-instruct")
    # Dequantised to dense fp32 first, then cast: asking transformers for bf16 straight from a GGUF keeps the
    # weights packed and computes in fp32, which is not the dense bf16 model llmkit runs.
    hf = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    hf = hf.to(getattr(torch, args.dtype)).eval()
    text = open(args.data, encoding="utf-8").read()
    tokens = np.asarray(lm.tokenizer.encode(text), dtype=np.int64)  # the very tokens llmkit scored
    loss, counted = hf_perplexity(hf, tokens, ours["context"])
    ppl = math.exp(loss)
    print(json.dumps({"bench": "smollm2_perplexity", "impl": "transformers", "dtype": args.dtype,
                      "data": args.data, "tokens": int(len(tokens)), "predicted_tokens": counted,
                      "loss": round(loss, 6), "perplexity": round(ppl, 4),
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    print(json.dumps({"bench": "smollm2_perplexity", "relative_difference": abs(ours["perplexity"] - ppl) / ppl,
                      "within_0.5_percent": abs(ours["perplexity"] - ppl) / ppl <= 0.005}), flush=True)


if __name__ == "__main__":
    main()
