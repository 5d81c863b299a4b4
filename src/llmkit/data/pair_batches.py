"""Batches of tokenised pairs for the one loop: an encoder–decoder's (source, target) and a decoder's SFT rows.

Each example is two id lists, `inputs` and `labels`:
- `seq2seq`: inputs = the encoder's source ids, labels = the target ids the decoder must produce. A batch is
  input_ids (B, S) + attention_mask (B, S) (1 = real token) + labels (B, T) with -100 on padding; the objective
  builds the decoder's teacher-forced inputs from the labels (train/objectives.py `Seq2Seq`).
- `causal`: inputs = a whole SFT row (prompt + answer), labels = the same row shifted by one with -100 on the
  prompt. A batch is input_ids (B, T) + labels (B, T), right-padded: under the causal mask no real token attends
  to a pad on its right, so no attention mask is needed (the `causal_lm` objective takes input_ids and labels).

Padding, not packing: rows are padded to the longest in their batch. Verse pairs are short and of similar
length, so with length-grouped batches (below) padding wastes little, and every row is one example that attends
only to itself; packing would need per-document attention masks to keep examples apart.

Length grouping ("sort-ish"): each epoch's seeded permutation is cut into pools of `POOL` batches, each pool is
sorted by length and cut into batches, and the batches' order is shuffled. Rows in a batch have similar lengths
(little padding, a faster step) while the order stays random. The position in the epoch is (epoch, index), as for
every batch order in data/batches.py, so checkpoints resume exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from llmkit.data.batches import ShuffledOrder
from llmkit.errors import DataError

IGNORE_INDEX = -100
POOL = 50  # batches per length-sorted pool
KINDS = ("seq2seq", "causal")


def collate_pairs(inputs: list[list[int]], labels: list[list[int]], pad_id: int, kind: str) -> dict[str, torch.Tensor]:
    """Right-pad one batch of examples into the tensors the objective of `kind` reads (module docstring)."""
    B, S, T = len(inputs), max(map(len, inputs)), max(map(len, labels))
    x = torch.full((B, S), pad_id, dtype=torch.long)  # (B, S)
    y = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    mask = torch.zeros((B, S), dtype=torch.long)  # (B, S)
    for i, (a, b) in enumerate(zip(inputs, labels)):
        x[i, :len(a)] = torch.tensor(a, dtype=torch.long)
        mask[i, :len(a)] = 1
        y[i, :len(b)] = torch.tensor(b, dtype=torch.long)
    if kind == "seq2seq":
        return {"input_ids": x, "attention_mask": mask, "labels": y}
    return {"input_ids": x, "labels": y}


def _check(inputs: list[list[int]], labels: list[list[int]], kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not inputs:
        raise DataError("no pairs to batch (every pair was dropped or the split is empty)")
    if len(inputs) != len(labels):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} label rows")


class PairBatches(ShuffledOrder):
    """Seeded, resumable, length-grouped batches of pairs; a batch never spans two epochs (the last one of an
    epoch may be smaller)."""

    def __init__(self, inputs: list[list[int]], labels: list[list[int]], batch_size: int, pad_id: int, kind: str,
                 seed: int = 0) -> None:
        _check(inputs, labels, kind)
        self.inputs, self.labels, self.B, self.pad_id, self.kind = inputs, labels, batch_size, pad_id, kind
        self.lengths = np.array([len(a) + len(b) for a, b in zip(inputs, labels)])
        super().__init__(seed)

    def _permutation(self, epoch: int) -> np.ndarray:
        """Examples in batch order: full, length-grouped batches in a shuffled order, then the partial one."""
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.inputs))
        pool, batches = POOL * self.B, []
        for s in range(0, len(perm), pool):
            chunk = perm[s:s + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i:i + self.B] for i in range(0, len(chunk), self.B))
        full = [b for b in batches if len(b) == self.B]
        rest = np.concatenate([b for b in batches if len(b) < self.B] or [np.zeros(0, dtype=np.int64)])
        order = rng.permutation(len(full))
        return np.concatenate([*(full[i] for i in order), rest]).astype(np.int64)

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= len(self._perm):
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        rows = self.take(min(self.B, len(self._perm) - self.index))
        return collate_pairs([self.inputs[i] for i in rows], [self.labels[i] for i in rows], self.pad_id, self.kind)


def fixed_pair_batches(inputs: list[list[int]], labels: list[list[int]], batch_size: int, pad_id: int, kind: str,
                       max_batches: int = 0, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Evaluation batches, the same every call: a seeded subset of `max_batches` x `batch_size` examples (0 = all),
    grouped by length."""
    _check(inputs, labels, kind)
    idx = np.arange(len(inputs))
    if max_batches and len(idx) > max_batches * batch_size:
        idx = np.sort(np.random.default_rng(seed).permutation(len(idx))[:max_batches * batch_size])
    idx = idx[np.argsort([len(inputs[i]) + len(labels[i]) for i in idx], kind="stable")]
    return [collate_pairs([inputs[i] for i in idx[s:s + batch_size]], [labels[i] for i in idx[s:s + batch_size]],
                          pad_id, kind) for s in range(0, len(idx), batch_size)]
