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
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llmkit.data.corpora import CORPORA, corpus_texts
from llmkit.data.readers import read_jsonl, read_text_pieces
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import DataError
from llmkit.files import atomic_write_text, read_json

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}
CHUNK_BYTES = 32 * 1024
MAX_CHUNK = 32 * CHUNK_BYTES  # a line longer than this (1 M characters) is cut
FLUSH_CHARS = 1 << 19  # tokenize pending chunks once they hold this much text
_LONG_WORD = re.compile(r"\S{1000}")


def documents(source: str, text_field: str = "text") -> Iterator[tuple[str, Iterator[str]]]:
    """(document id, its text in pieces) from a built-in corpus name, a text file, a folder of text files, or
    JSONL. Text files are streamed (`read_text_pieces`): consume each document's pieces before the next."""
    if source in CORPORA and not Path(source).exists():
        yield from corpus_texts(source)
        return
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and (f.suffix in TEXT_SUFFIXES or f.suffix == ".jsonl"))
        if not files:
            raise DataError(f"{p}: no .txt/.md/.jsonl files in this folder")
        for f in files:
            yield from documents(str(f), text_field)
    elif p.is_file():
        if p.suffix == ".jsonl":
            yield from ((doc, iter([text])) for doc, text in _jsonl_documents(p, text_field))
        else:
            yield str(p), read_text_pieces(p)
    else:
        raise DataError(f"corpus not found: {source!r} is neither a file, a folder nor a built-in corpus "
                        f"({', '.join(CORPORA)})")


def iter_texts(source: str, text_field: str = "text") -> Iterator[str]:
    """Every document's text, in pieces of at most ~1 MB cut at line breaks: what tokenizer training reads.

    A "word" (run of non-space characters) longer than LONG_WORD is cut with line breaks: BPE training time grows
    with the square of a word's length (a 1 MB line without spaces would take hours), and no real word is that
    long (sentencepiece skips such sentences for the same reason)."""
    for _, pieces in documents(source, text_field):
        for piece in pieces:
            yield _LONG_WORD.sub(lambda m: m.group(0) + "\n", piece)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    for n, record in read_jsonl(path):
        if text_field not in record:
            raise DataError(f"{path}:{n}: no {text_field!r} field (choose another with --text-field)")
        if not isinstance(record[text_field], str):
            raise DataError(f"{path}:{n}: field {text_field!r} is not a string")
        yield f"{path}:{n}", record[text_field]


def _chunks(pieces: Iterable[str], size: int = CHUNK_BYTES, cap: int = MAX_CHUNK) -> Iterator[str]:
    """Cut a document, given in pieces, into chunks of about `size` characters ending at a line break (a line
    longer than `cap` is cut at `cap`). The chunks depend only on the text, never on where the pieces end, so
    streaming gives the same shards as reading the document whole."""
    buf, start = "", 0
    for piece in pieces:
        buf, start = buf[start:] + piece, 0
        while True:
            end = buf.find("\n", start + size, start + cap)
            if end < 0:
                if len(buf) - start < cap:
                    break
                end = start + cap - 1
            yield buf[start:end + 1]
            start = end + 1
    if start < len(buf):
        yield buf[start:]


def _document_chunks(pieces: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """(chunk, ends the document) for one document; nothing for a blank one (only leading blank chunks wait)."""
    chunks = _chunks(pieces)
    held: list[str] = []
    for chunk in chunks:
        held.append(chunk)
        if chunk.strip():
            break
    else:
        return
    prev = held.pop()
    for blank in held:
        yield blank, False
    for chunk in chunks:
        yield prev, False
        prev = chunk
    yield prev, True


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
    n_chunks = n_docs = pending_chars = 0
    pending: list[tuple[str, str, bool]] = []  # (split, text, ends a document)

    def flush() -> None:
        ids = tok.encode_batch([t for _, t, _ in pending])  # parallel in Rust
        for (split, text, last), chunk_ids in zip(pending, ids):
            writers[split].write(chunk_ids + ([tok.eos_id] if last else []), len(text.encode("utf-8")))
        pending.clear()

    try:
        docs = documents(source, text_field)
        first = next(docs, None)  # a missing corpus fails here, before a progress bar is drawn
        with tqdm(desc=f"tokenizing {source}", unit="B", unit_scale=True, disable=quiet) as bar:
            for _, pieces in itertools.chain([first] if first else [], docs):
                for chunk, last in _document_chunks(pieces):
                    split = "val" if n_chunks % val_every == val_every - 1 else "train"
                    pending.append((split, chunk, last))
                    n_chunks, n_docs, pending_chars = n_chunks + 1, n_docs + last, pending_chars + len(chunk)
                    bar.update(len(chunk))
                    if pending_chars >= FLUSH_CHARS or len(pending) >= 256:  # memory stays flat
                        flush()
                        pending_chars = 0
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
    """meta.json of a token shard folder, checked: a corrupt or hand-edited one is a one-line error naming it."""
    p = Path(data_dir) / "meta.json"
    if not p.is_file():
        raise DataError(f"{data_dir}: no meta.json here (make token shards with `llmkit prepare`)")
    meta = read_json(p, DataError)
    splits = meta.get("splits")
    ok = (meta.get("dtype") in ("uint16", "uint32") and _count(meta.get("vocab_size"), 1)
          and isinstance(splits, dict) and all(isinstance(splits.get(s), dict) and _count(splits[s].get("tokens"))
                                               and _count(splits[s].get("bytes")) for s in ("train", "val")))
    if not ok:
        raise DataError(f"{p}: not a meta.json written by `llmkit prepare` (needs dtype uint16/uint32, vocab_size "
                        "and splits.train/val with tokens and bytes); re-run `llmkit prepare`")
    return meta


def _count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def load_tokens(data_dir: str | Path, split: str) -> np.memmap:
    meta = load_meta(data_dir)
    if split not in meta["splits"]:
        raise DataError(f"{data_dir}: no split {split!r} (valid: {', '.join(meta['splits'])})")
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path}: missing token shard (re-run `llmkit prepare`)")
    dtype = np.dtype(meta["dtype"])
    expected = meta["splits"][split]["tokens"] * dtype.itemsize
    if path.stat().st_size != expected:
        raise DataError(f"{path}: {path.stat().st_size} bytes, meta.json says {expected}: the shard is truncated "
                        "or from another run (re-run `llmkit prepare`)")
    return np.memmap(path, dtype=dtype, mode="r")
