"""Reading user files: JSONL records and plain passages, with a one-line error naming the file and line.

Every JSONL reader (corpora, labelled datasets, passages to embed) goes through `read_jsonl`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmkit.errors import DataError


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line of a JSONL file; a bad line is a one-line error naming it.
    Every JSONL reader (corpora, labelled datasets, passages to embed) goes through here."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: expected a JSON object per line")
            yield n, record



def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Passages from a file: .jsonl (`text_field`), .csv/.tsv (`text_field` column) or text (one per line)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"file not found: {path}")
    try:
        if p.suffix == ".jsonl":
            texts = []
            for n, rec in read_jsonl(p):
                if not isinstance(rec.get(text_field), str):
                    raise DataError(f"{p}:{n}: no string {text_field!r} field (choose with --text-field)")
                texts.append(rec[text_field])
        elif p.suffix in (".csv", ".tsv"):
            with p.open(encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if p.suffix == ".tsv" else ",")
                if text_field not in (reader.fieldnames or []):
                    raise DataError(f"{p}: no {text_field!r} column (columns: {', '.join(reader.fieldnames or [])};"
                                    " choose with --text-field)")
                texts = [r[text_field] or "" for r in reader]
        else:
            texts = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start})") from None
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise DataError(f"{p}: no non-empty texts")
    return texts
