"""Text augmentation for classification training batches: word dropout and word swap, seeded and resumable.

Why: a classifier fine-tuned on one domain leans on that domain's exact phrasings. Deleting or swapping a few
words each time a training text is drawn makes it lean on the sentiment-bearing words that survive, which is
what carries over to other domains (product reviews, editorials, tweets). The edits are word-level (whitespace
words, then the model's own tokenizer): deleting a sub-word piece would only produce non-words.

Only training batches are edited (`AugmentedBatches`); validation and test texts never pass through here. The
randomness of a batch is a function of (seed, epoch, position), the batch order's own resumable state, so a
resumed run draws exactly the edits it would have drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from llmkit.config.sections import AUGMENTATIONS
from llmkit.data.batches import LabelledBatches, collate
from llmkit.errors import ConfigError


def word_dropout(words: list[str], p: float, rng: np.random.Generator) -> list[str]:
    """Each word deleted with probability p; one word always stays (an empty text has no label)."""
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return [w for w, k in zip(words, keep) if k]


def word_swap(words: list[str], p: float, rng: np.random.Generator) -> list[str]:
    """Left to right, each word trades places with its right neighbour with probability p (a moved word is not
    moved again in the same pass)."""
    out, i = list(words), 0
    draws = rng.random(len(words))
    while i < len(out) - 1:
        if draws[i] < p:
            out[i], out[i + 1] = out[i + 1], out[i]
            i += 2
        else:
            i += 1
    return out


OPS: dict[str, Callable[[list[str], float, np.random.Generator], list[str]]] = {
    "word_dropout": word_dropout, "word_swap": word_swap}
assert tuple(OPS) == AUGMENTATIONS  # the config validates against AUGMENTATIONS: keep the two in step


def augment_texts(texts: Sequence[str], ops: Sequence[str], p: float, rng: np.random.Generator) -> list[str]:
    """Apply `ops` in order to every text (whitespace words); a text of one word or none comes back as it was."""
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ConfigError(f"finetune.augment: unknown augmentation {unknown[0]!r} (valid: {', '.join(OPS)})")
    out = []
    for text in texts:
        words = text.split()
        if len(words) > 1:
            for op in ops:
                words = OPS[op](words, p, rng)
            text = " ".join(words)
        out.append(text)
    return out


class AugmentedBatches(LabelledBatches):
    """LabelledBatches over raw texts: each batch's texts are edited afresh, then tokenised by `encode`.

    `ids` (the clean encodings) keep the parent's bookkeeping (the number of examples); `texts` are what is
    edited. The same batch order as without augmentation: only the words inside each text differ."""

    def __init__(self, ids: list[list[int]], texts: list[str], labels: list[int],
                 encode: Callable[[list[str]], list[list[int]]], batch_size: int, pad_id: int,
                 ops: Sequence[str], p: float, seed: int = 0) -> None:
        super().__init__(ids, labels, batch_size, pad_id, seed=seed)
        self.texts, self.encode, self.ops, self.p = texts, encode, list(ops), p

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= len(self._perm):
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        rng = np.random.default_rng([self.seed, self.epoch, self.index, 1])  # 1: not the permutation's stream
        rows = self.take(min(self.B, len(self._perm) - self.index))
        texts = augment_texts([self.texts[i] for i in rows], self.ops, self.p, rng)
        return collate(self.encode(texts), [self.labels[i] for i in rows], self.pad_id)
