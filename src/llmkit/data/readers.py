"""Reading user files: JSONL records, CSV/TSV rows, plain passages and streamed text, with a one-line error
naming the file and line (or byte) for anything malformed.

Every JSONL reader (corpora, labelled datasets, passages to embed) goes through `read_jsonl`, every CSV/TSV
reader through `read_csv`, and large text files are read through `read_text_pieces`, whose memory does not grow
with the file. A UTF-8 byte-order mark (what Excel and Notepad write) is accepted and dropped everywhere.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmkit.errors import DataError

PIECE_BYTES = 1 << 20  # read text files 1 MB at a time


def _not_utf8(path: Path, byte: int, where: str = "") -> DataError:
    return DataError(f"{path}{where}: not UTF-8 text (invalid byte at offset {byte}); convert it first, e.g. "
                     f"`iconv -f latin1 -t utf-8`")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line of a JSONL file; a bad line is a one-line error naming it.
    Every JSONL reader (corpora, labelled datasets, passages to embed) goes through here. Lines are read as bytes
    and decoded one by one, so invalid UTF-8 is reported with its line and byte offset."""
    offset = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, offset + e.start, f":{n}") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path}:{n}: JSON nested too deeply") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(record).__name__}")
            yield n, record


def read_csv(path: Path, required: tuple[tuple[str, str], ...] = ()) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each row of a CSV (or, by suffix, TSV) file with a header row.

    `required` is (column, the option that names it) pairs; a missing one is an error listing the columns.
    A byte-order mark is dropped (else the first column would be called '\\ufeffcolumn')."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            columns = reader.fieldnames or []
            for key, option in required:
                if key not in columns:
                    raise DataError(f"{path}: no {key!r} column (columns: {', '.join(map(repr, columns)) or 'none'}"
                                    f"; choose another with {option})")
            for row in reader:
                yield reader.line_num, {k: v for k, v in row.items() if isinstance(k, str)}
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e.start, " (somewhere in the file)") from None
    except csv.Error as e:
        raise DataError(f"{path}: not readable as {path.suffix[1:].upper()} ({e})") from None


def read_text_pieces(path: Path, piece_bytes: int | None = None, errors: str = "strict") -> Iterator[str]:
    """A text file in pieces of about `piece_bytes`, each cut just after a line break (a line longer than a piece
    is cut where the piece ends). Decoding is incremental, so a character split across two reads is whole, and
    memory stays at about two pieces whatever the file's size. Invalid UTF-8 is an error naming the byte offset
    (with errors="strict")."""
    piece_bytes = piece_bytes or PIECE_BYTES
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    carry, offset = "", 0
    with path.open("rb") as f:
        while True:
            raw = f.read(piece_bytes)
            pending = len(decoder.getstate()[0])  # bytes of a character the last read cut in two
            try:
                text = carry + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise _not_utf8(path, offset - pending + e.start) from None
            if offset == 0 and text.startswith("\ufeff"):  # a byte-order mark, not text
                text = text[1:]
            offset += len(raw)
            if not raw:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1
            if cut == 0 and len(text) >= piece_bytes:
                cut = len(text)
            carry = text[cut:]
            if cut:
                yield text[:cut]


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Passages from a file: .jsonl (`text_field`), .csv/.tsv (`text_field` column) or text (one per line)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"file not found: {path}")
    if p.suffix == ".jsonl":
        texts = []
        for n, rec in read_jsonl(p):
            if not isinstance(rec.get(text_field), str):
                raise DataError(f"{p}:{n}: no string {text_field!r} field (choose with --text-field)")
            texts.append(rec[text_field])
    elif p.suffix in (".csv", ".tsv"):
        texts = [row[text_field] or "" for _, row in read_csv(p, ((text_field, "--text-field"),))]
    else:
        texts = "".join(read_text_pieces(p)).splitlines()
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise DataError(f"{p}: no non-empty texts")
    return texts
