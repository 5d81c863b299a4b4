"""Batches in a seeded, resumable order: token windows for language modelling, padded rows for classification.

Both walk a seeded permutation, one per epoch; their position (epoch, index) is a two-number state that a
checkpoint saves, so a resumed run sees exactly the batches it would have seen. `ShuffledOrder` is that walk,
written once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmkit.data.shards import load_tokens
from llmkit.errors import DataError


class ShuffledOrder:
    """A seeded permutation of `n` items per epoch and a resumable position in it."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epoch, self.index = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._perm = self._permutation(self.epoch)

    def take(self, n: int) -> np.ndarray:
        """The next `n` items, running into the next epoch's permutation when this one ends."""
        out: list[np.ndarray] = []
        while n > 0:
            if self.index >= len(self._perm):
                self.epoch, self.index = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            got = self._perm[self.index:self.index + n]
            self.index += len(got)
            n -= len(got)
            out.append(got)
        return np.concatenate(out)

    def __iter__(self):
        return self


class TokenBatches(ShuffledOrder):
    """Seeded, resumable batches of (input_ids, labels) windows from one split.

    With `world > 1` each rank takes its own slice of every global batch (data parallel, no overlap).
    """

    def __init__(self, data_dir: str | Path, split: str, block_size: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.data = load_tokens(data_dir, split)
        self.T, self.B, self.rank, self.world = block_size, batch_size, rank, world
        if len(self.data) < block_size + 1:
            raise DataError(f"{data_dir}/{split}.bin has {len(self.data)} tokens, fewer than one window of "
                            f"{block_size + 1}; lower model.block_size or add text")
        super().__init__(seed)
        if batch_size * world > self.windows_per_epoch:  # a batch would repeat windows (or never fill: a typo)
            raise DataError(f"{data_dir}/{split}.bin has {self.windows_per_epoch} windows of {block_size + 1} tokens, "
                            f"fewer than one batch of {batch_size * world}; lower data.batch_size or "
                            "model.block_size, or add text")

    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        shift = int(rng.integers(self.T)) if len(self.data) > 2 * self.T + 1 else 0
        n = (len(self.data) - 1 - shift) // self.T
        return shift + self.T * rng.permutation(n)  # window start offsets

    @property
    def windows_per_epoch(self) -> int:
        return len(self._perm)

    def __next__(self) -> dict[str, torch.Tensor]:
        starts = self.take(self.B * self.world)[self.rank * self.B:(self.rank + 1) * self.B]
        rows = np.stack([self.data[s:s + self.T + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        t = torch.from_numpy(rows)
        return {"input_ids": t[:, :-1], "labels": t[:, 1:]}

    def fixed(self, n_batches: int) -> list[dict[str, torch.Tensor]]:
        """The same `n_batches` every call (evaluation), capped at one pass over the split."""
        out = []
        saved = self.state_dict()
        self.load_state_dict({"epoch": 0, "index": 0})
        limit = max(1, self.windows_per_epoch // (self.B * self.world))
        for _ in range(min(n_batches, limit)):
            out.append(next(self))
        self.load_state_dict(saved)
        return out


class LabelledBatches(ShuffledOrder):
    """Seeded, resumable mini-batches of (input_ids, attention_mask, labels), padded to the longest row.

    A batch never spans two epochs (the last one of an epoch may be smaller), as in a DataLoader."""

    def __init__(self, ids: list[list[int]], labels: list[int], batch_size: int, pad_id: int, seed: int = 0) -> None:
        if not ids:
            raise DataError("no examples to batch")
        self.ids, self.labels, self.B, self.pad_id = ids, labels, batch_size, pad_id
        super().__init__(seed)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= len(self._perm):
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        rows = self.take(min(self.B, len(self._perm) - self.index))
        return collate([self.ids[i] for i in rows], [self.labels[i] for i in rows], self.pad_id)


def collate(ids: list[list[int]], labels: list[int] | None, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad id lists into input_ids (B, T) + attention_mask (B, T) (+ labels (B,))."""
    T = max(len(r) for r in ids)
    x = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, r in enumerate(ids):
        x[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    out = {"input_ids": x, "attention_mask": mask}
    if labels is not None:
        out["labels"] = torch.tensor(labels, dtype=torch.long)
    return out


def fixed_batches(ids: list[list[int]], labels: list[int] | None, batch_size: int,
                  pad_id: int) -> tuple[list[dict[str, torch.Tensor]], np.ndarray]:
    """Evaluation batches grouped by length (little padding); also the order, to map predictions back."""
    order = np.argsort([len(r) for r in ids], kind="stable")
    batches = [collate([ids[i] for i in order[s:s + batch_size]],
                       None if labels is None else [labels[i] for i in order[s:s + batch_size]], pad_id)
               for s in range(0, len(ids), batch_size)]
    return batches, order
