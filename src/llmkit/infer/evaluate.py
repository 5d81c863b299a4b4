"""Language-model evaluation: loss, perplexity and bits per byte over a whole split or a text file.

Bits per byte divides the total information by the UTF-8 bytes of the text, so models with different tokenizers
(char-level, BPE 4k, GPT-2 50k) are compared on the same footing; perplexity alone is not comparable across them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from llmkit.data.shards import load_meta, load_tokens
from llmkit.errors import DataError
from llmkit.infer.api import LLM
from llmkit.model.loss import linear_cross_entropy, lm_figures


def token_stream(llm: LLM, data: str | Path, split: str = "val") -> tuple[np.ndarray, int, str]:
    """Tokens, their UTF-8 byte count and a description, from a prepared data folder or a text file."""
    p = Path(data)
    if p.is_dir():
        meta = load_meta(p)
        if split not in meta["splits"]:
            raise DataError(f"{p}: no split {split!r} (valid: {', '.join(meta['splits'])})")
        if meta["vocab_size"] != llm.tokenizer.vocab_size:
            raise DataError(f"{p} was tokenized with a {meta['vocab_size']}-token vocabulary, the model uses "
                            f"{llm.tokenizer.vocab_size}; evaluate on a text file instead")
        return np.asarray(load_tokens(p, split)), meta["splits"][split]["bytes"], f"{p} ({split})"
    if p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text (byte {e.start})") from None
        if not text.strip():
            raise DataError(f"{p}: the file is empty")
        return np.asarray(llm.tokenizer.encode(text), dtype=np.int64), len(text.encode("utf-8")), str(p)
    raise DataError(f"evaluation data not found: {data} (give a prepared data folder or a text file)")


@torch.inference_mode()
def evaluate_lm(llm: LLM, data: str | Path, split: str = "val", batch_size: int = 8,
                context: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Mean next-token loss over non-overlapping windows covering every token once."""
    text_tokens, nbytes, desc = token_stream(llm, data, split)
    # A model that reads BOS first (Tokenizer.add_bos) scores the text after it, as it was trained to.
    bos = llm.tokenizer.with_bos([])
    tokens = np.concatenate([np.asarray(bos, dtype=text_tokens.dtype), text_tokens]) if bos else text_tokens
    if len(tokens) < 2:
        raise DataError(f"{desc}: fewer than 2 tokens, nothing to predict")
    model = llm.model.eval()
    T = min(context or model.cfg.block_size, model.cfg.block_size)
    starts = list(range(0, len(tokens) - 1, T))
    total_nll, counted = 0.0, 0
    device = llm.device
    for i in tqdm(range(0, len(starts), batch_size), desc="evaluating", unit="batch", disable=quiet):
        group = starts[i:i + batch_size]
        windows = [torch.from_numpy(np.asarray(tokens[s:s + T + 1], dtype=np.int64)) for s in group]
        n = max(len(w) for w in windows)
        batch = torch.zeros(len(windows), n, dtype=torch.long)
        labels = torch.full((len(windows), n - 1), -100, dtype=torch.long)
        for j, w in enumerate(windows):
            batch[j, : len(w)] = w
            labels[j, : len(w) - 1] = w[1:]
        # Hidden states only, then the head and the loss fused and chunked: (B, T, V) logits never exist
        # (at an 8k context they would be gigabytes). The head is cut to the real vocabulary.
        hidden = model(batch[:, :-1].to(device), logits_slice=slice(0, 0)).hidden  # (B, T, C)
        valid = int((labels != -100).sum())
        mean = linear_cross_entropy(hidden, model.lm_head.weight[: model.cfg.vocab_size], labels.to(device))
        total_nll += float(mean) * valid
        counted += valid
    loss = total_nll / counted
    return {"loss": loss, **lm_figures(loss, len(text_tokens), nbytes), "tokens": int(len(text_tokens)),
            "predicted_tokens": counted, "bytes": int(nbytes), "data": desc, "context": T,
            "bits_per_token": loss / math.log(2)}
