"""Corpora -> token shards on disk -> batches.

`prepare` streams any corpus (built-in name, text file, folder of text files, JSONL) through a tokenizer into
`train.bin` / `val.bin` (flat uint16 or uint32 token arrays read back with `np.memmap`, so a corpus larger than
RAM works) and a `meta.json` with token and byte counts (bits per byte needs the bytes). Documents are cut into
~32 KB chunks at line breaks and every k-th chunk goes to validation: a deterministic split that samples the
whole corpus, not just its tail.

`TokenBatches` walks non-overlapping windows in a seeded random order, one permutation per epoch. Its position
(epoch, index) is a two-number state that a checkpoint saves, so a resumed run sees exactly the batches it
would have seen.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llmkit.data.corpora import CORPORA, corpus_documents
from llmkit.data.readers import read_jsonl
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import DataError
from llmkit.files import atomic_write_text

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}
CHUNK_BYTES = 32 * 1024


def iter_documents(source: str, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(document id, text) from a built-in corpus name, a text file, a folder of text files, or JSONL."""
    if source in CORPORA and not Path(source).exists():
        yield from corpus_documents(source)
        return
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and (f.suffix in TEXT_SUFFIXES or f.suffix == ".jsonl"))
        if not files:
            raise DataError(f"{p}: no .txt/.md/.jsonl files in this folder")
        for f in files:
            yield from iter_documents(str(f), text_field)
    elif p.is_file():
        if p.suffix == ".jsonl":
            yield from _jsonl_documents(p, text_field)
        else:
            try:
                yield str(p), p.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p}: not UTF-8 text (byte {e.start}); convert it first") from None
    else:
        raise DataError(f"corpus not found: {source!r} is neither a file, a folder nor a built-in corpus "
                        f"({', '.join(CORPORA)})")


def _jsonl_documents(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    for n, record in read_jsonl(path):
        if text_field not in record:
            raise DataError(f"{path}:{n}: no {text_field!r} field (choose another with --text-field)")
        if not isinstance(record[text_field], str):
            raise DataError(f"{path}:{n}: field {text_field!r} is not a string")
        yield f"{path}:{n}", record[text_field]


def _chunks(text: str, size: int = CHUNK_BYTES) -> Iterator[str]:
    """Cut a document at line breaks into pieces of about `size` characters."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


class _ShardWriter:
    """Appends token arrays to `<split>.bin.tmp`; `close` renames into place (a crash leaves no half shard)."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype = path, dtype
        self.tmp = path.with_suffix(".bin.tmp")
        self.f = self.tmp.open("wb")
        self.tokens = 0
        self.bytes = 0

    def write(self, ids: list[int], nbytes: int) -> None:
        np.asarray(ids, dtype=self.dtype).tofile(self.f)
        self.tokens += len(ids)
        self.bytes += nbytes

    def close(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def prepare(source: str, tokenizer_dir: str | Path, out_dir: str | Path, val_fraction: float = 0.1,
            text_field: str = "text", quiet: bool = False) -> dict[str, Any]:
    """Tokenize a corpus into train/val shards + meta.json; returns the meta."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    tok = Tokenizer.load(tokenizer_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)
    writers = {s: _ShardWriter(out / f"{s}.bin", dtype) for s in ("train", "val")}
    val_every = max(2, round(1 / val_fraction))
    n_chunks = n_docs = 0
    pending: list[tuple[str, str, bool]] = []  # (split, text, ends a document)

    def flush() -> None:
        ids = tok.encode_batch([t for _, t, _ in pending])  # parallel in Rust
        for (split, text, last), chunk_ids in zip(pending, ids):
            writers[split].write(chunk_ids + ([tok.eos_id] if last else []), len(text.encode("utf-8")))
        pending.clear()

    try:
        docs = iter_documents(source, text_field)
        first = next(docs, None)  # a missing corpus fails here, before a progress bar is drawn
        with tqdm(desc=f"tokenizing {source}", unit="B", unit_scale=True, disable=quiet) as bar:
            for _, text in itertools.chain([first] if first else [], docs):
                if not text.strip():
                    continue
                n_docs += 1
                pieces = list(_chunks(text))
                for i, piece in enumerate(pieces):
                    split = "val" if n_chunks % val_every == val_every - 1 else "train"
                    pending.append((split, piece, i == len(pieces) - 1))
                    n_chunks += 1
                    bar.update(len(piece))
                if len(pending) >= 256:
                    flush()
            flush()
        if n_docs == 0:
            raise DataError(f"corpus {source!r} is empty: no non-blank text found")
        if writers["val"].tokens == 0:  # a corpus of one chunk: validation gets the tail of train instead
            _move_tail(writers["train"], writers["val"], val_fraction)
    except BaseException:
        for w in writers.values():  # leave no partial shards; earlier complete ones stay as they were
            w.discard()
        raise
    for w in writers.values():
        w.close()
    tok_dir = out / "tokenizer"
    if Path(tokenizer_dir).resolve() != tok_dir.resolve():
        shutil.rmtree(tok_dir, ignore_errors=True)
        tok.save(tok_dir)
    meta = {
        "source": source, "documents": n_docs, "vocab_size": tok.vocab_size, "dtype": dtype.name,
        "eos_id": tok.eos_id, "tokenizer": "tokenizer", "val_fraction": val_fraction,
        "splits": {s: {"tokens": w.tokens, "bytes": w.bytes} for s, w in writers.items()},
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return meta


def _move_tail(train: _ShardWriter, val: _ShardWriter, fraction: float) -> None:
    train.f.close()
    ids = np.fromfile(train.tmp, dtype=train.dtype)
    n_val = max(1, int(len(ids) * fraction))
    if len(ids) - n_val < 2:
        raise DataError(f"corpus has only {len(ids)} tokens: too few to split into train and validation")
    val_bytes = round(train.bytes * n_val / len(ids))
    val.write(ids[-n_val:].tolist(), val_bytes)
    train.f = train.tmp.open("r+b")
    train.f.truncate((len(ids) - n_val) * train.dtype.itemsize)
    train.tokens, train.bytes = len(ids) - n_val, train.bytes - val_bytes


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    p = Path(data_dir) / "meta.json"
    if not p.is_file():
        raise DataError(f"{data_dir}: no meta.json here (make token shards with `llmkit prepare`)")
    return json.loads(p.read_text())


def load_tokens(data_dir: str | Path, split: str) -> np.memmap:
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path}: missing token shard (re-run `llmkit prepare`)")
    dtype = np.dtype(meta["dtype"])
    expected = meta["splits"][split]["tokens"] * dtype.itemsize
    if path.stat().st_size != expected:
        raise DataError(f"{path}: {path.stat().st_size} bytes, meta.json says {expected}: the shard is truncated "
                        "or from another run (re-run `llmkit prepare`)")
    return np.memmap(path, dtype=dtype, mode="r")
