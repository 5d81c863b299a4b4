"""Calibration data for the compressors that look at activations (GPTQ, Wanda): token windows from any text
source, and the inputs each chosen Linear layer sees when the model reads them.

A calibrated method needs the statistics of real inputs (GPTQ's Hessian X^T X, Wanda's per-column norm ||X||),
not the weights alone: a few hundred windows of ordinary text are enough for a 100 M-parameter model (GPTQ paper:
128 sequences of 2048 tokens for models up to 175 B). Windows are drawn at seeded random offsets so they sample the
whole text, not just its start.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from llmkit.data.shards import documents, load_meta, load_tokens
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import DataError

DEFAULT_CALIB = "shakespeare"  # built-in, offline; `--calib` points elsewhere (text file, folder, JSONL, shards)
MAX_TEXT_CHARS = 8_000_000  # read at most this much text: a few hundred windows never need more


def _text_tokens(tokenizer: Tokenizer, source: str, need: int) -> np.ndarray:
    """Token ids of a text source, reading documents until ~4x the tokens needed (or MAX_TEXT_CHARS) are in."""
    pieces: list[str] = []
    chars = 0
    ids: list[int] = []
    for _, doc in documents(source):
        for piece in doc:
            pieces.append(piece)
            chars += len(piece)
        if chars >= MAX_TEXT_CHARS:
            break
        if chars > 16 * need:  # ~4 characters per token: about 4x the tokens needed
            break
    for chunk in pieces:
        if chunk.strip():
            ids.extend(tokenizer.encode(chunk))
    return np.asarray(ids, dtype=np.int64)


def calibration_ids(tokenizer: Tokenizer, data: str | Path | None, n_seqs: int, seq_len: int,
                    seed: int = 0) -> Tensor:
    """(N, T) token windows (N <= n_seqs: fewer when the text holds fewer non-overlapping windows) from a text
    file, a folder of text files, JSONL, a `llmkit prepare` shard folder (its train split) or a built-in corpus
    name (None: DEFAULT_CALIB). Empty or too-short data is a one-line DataError naming it."""
    if n_seqs < 1 or seq_len < 2:
        raise DataError(f"calibration needs at least 1 sequence of 2 tokens, got {n_seqs} x {seq_len}")
    source = str(data) if data is not None else DEFAULT_CALIB
    p = Path(source)
    if p.is_dir() and (p / "meta.json").is_file():
        meta = load_meta(p)
        if meta["vocab_size"] != tokenizer.vocab_size:
            raise DataError(f"{p} was tokenized with a {meta['vocab_size']}-token vocabulary, the model uses "
                            f"{tokenizer.vocab_size}; give a text file for --calib instead")
        tokens = np.asarray(load_tokens(p, "train"), dtype=np.int64)
    else:
        if p.is_file() and p.stat().st_size == 0:
            raise DataError(f"calibration data {p}: the file is empty")
        tokens = _text_tokens(tokenizer, source, n_seqs * seq_len)
    available = len(tokens) // seq_len
    if available == 0:
        raise DataError(f"calibration data {source}: {len(tokens)} tokens, fewer than one window of {seq_len} "
                        "(give more text)")
    n = min(n_seqs, available)
    rng = np.random.default_rng(seed)
    # Non-overlapping windows: a random choice of n window slots, each shifted by one shared random offset.
    slots = np.sort(rng.choice(available, size=n, replace=False))
    shift = int(rng.integers(0, len(tokens) - available * seq_len + 1))
    rows = np.stack([tokens[shift + s * seq_len: shift + (s + 1) * seq_len] for s in slots])  # (N, T)
    return torch.from_numpy(rows)


@torch.no_grad()
def capture_linear_inputs(model: nn.Module, ids: Tensor, names: list[str], fn: Callable[[str, Tensor], None],
                          batch_size: int = 8, quiet: bool = True) -> None:
    """Run `model` over `ids` (N, T) in batches and call fn(name, x) with the input x (rows, in_features) of each
    named nn.Linear, in forward order. Layers that read the same tensor (q/k/v, gate/up) get the same x object, so a
    caller can compute a statistic once per distinct input (`x is previous_x`)."""
    from tqdm import tqdm

    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"no such modules: {unknown[:3]}")
    flat: dict[int, Tensor] = {}  # id(original input) -> its (rows, in) view, so shared inputs stay one object

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(mod: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0]
            if id(x) not in flat:
                flat.clear()
                flat[id(x)] = x.reshape(-1, x.shape[-1])  # (rows, in_features)
            fn(name, flat[id(x)])
        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(0, len(ids), batch_size), desc="calibrating", unit="batch", disable=quiet):
            model(ids[i:i + batch_size].to(device), logits_slice=slice(0, 0))
            flat.clear()
    finally:
        for h in handles:
            h.remove()
