"""Labelled text for classification: CSV / TSV / JSONL files and the built-in VADER sets, split and batched.

The built-in sets are the four human-rated sets of Hutto & Gilbert (ICWSM 2014), shipped inside the
vaderSentiment 3.3.2 source distribution (MIT) as `additional_resources/hutto_ICWSM_2014.tar.gz`. `make setup`
fetches that sdist with pip into `.venv/share/llmkit/`; it is read from there without unpacking. Each line is
`id<TAB>mean rating<TAB>text`, the mean of about 20 raters on -4..+4; label = sign of the mean:

- `movie-reviews` (10,605 Rotten Tomatoes sentences): the 37 rated exactly 0 are dropped, leaving 10,568.
- `vader-amazon` (3,708 product-review sentences), `vader-nyt` (5,190 New York Times editorial sentences),
  `vader-tweets` (4,200 tweets): only texts with |mean rating| >= 0.5 are kept (2,985 / 2,970 / 3,432). These
  sets hold many neutral, factual sentences ("Events include sprinting, broad jumping, ..." is rated +0.15): a
  mean that close to 0 says the raters saw no sentiment or disagreed, so its sign is noise that a binary
  classifier can be neither right nor wrong about. Half a point of the 9-point scale is the cut.

`vader-nyt` and `vader-tweets` are TEST-ONLY: they measure how a classifier holds up outside its training domain,
so training, early stopping or model selection on them would void that figure. Training verbs refuse them; for
`llmkit eval` their test split is the whole set. `vader-amazon` is the domain a user "has": train or mix it in.

Every other dataset is cut by one fixed, seeded 80/10/10 split, so every model in a comparison sees the same test
set. Handling of bad input: a missing text/label column, an empty label or a single class is an error that names
the file (and line); rows with an empty text are dropped with a warning; val/test rows whose label never occurs
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
VADER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"


@dataclass(frozen=True)
class VaderSet:
    member: str  # file inside hutto_ICWSM_2014.tar.gz
    min_abs_rating: float  # keep texts whose |mean rating| >= this; 0 keeps every rating but an exact 0
    test_only: bool
    about: str


VADER_SETS = {
    "movie-reviews": VaderSet("movieReviewSnippets_GroundTruth.txt", 0.0, False,
                              "10,568 Rotten Tomatoes sentences, negative/positive"),
    "vader-amazon": VaderSet("amazonReviewSnippets_GroundTruth.txt", 0.5, False,
                             "2,985 Amazon product-review sentences, |rating| >= 0.5"),
    "vader-nyt": VaderSet("nytEditorialSnippets_GroundTruth.txt", 0.5, True,
                          "2,970 NYT editorial sentences, |rating| >= 0.5, test only"),
    "vader-tweets": VaderSet("tweets_GroundTruth.txt", 0.5, True, "3,432 tweets, |rating| >= 0.5, test only"),
}
BUILTIN = {name: f"{v.about} (vaderSentiment 3.3.2 sdist)" for name, v in VADER_SETS.items()}

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

    def __add__(self, other: Examples) -> Examples:
        return Examples(self.texts + other.texts, self.labels + other.labels)


def data_dirs() -> list[Path]:
    """Where fetched data is looked for: $LLMKIT_DATA_DIR, then the venv's share/llmkit (where `make setup` puts
    it), then ~/.cache/llmkit."""
    dirs = [Path(os.environ["LLMKIT_DATA_DIR"])] if os.environ.get("LLMKIT_DATA_DIR") else []
    return dirs + [Path(sys.prefix) / "share" / "llmkit", Path.home() / ".cache" / "llmkit"]


def parse_ground_truth(raw: str, min_abs_rating: float) -> Examples:
    """`id<TAB>rating<TAB>text` lines -> labels `negative` / `positive` by the sign of the rating, keeping
    |rating| >= min_abs_rating (and never an exact 0); malformed lines and empty texts are skipped."""
    texts, labels = [], []
    for line in raw.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        try:
            rating = float(parts[1])
        except ValueError:
            continue
        if rating != 0 and abs(rating) >= min_abs_rating and parts[2].strip():
            texts.append(parts[2].strip())
            labels.append("positive" if rating > 0 else "negative")
    return Examples(texts, labels)


def vader_set(name: str) -> Examples:
    """One built-in set (VADER_SETS), in file order: the one reader for all four ground-truth files."""
    spec = VADER_SETS[name]
    sdist = next((d / VADER_SDIST for d in data_dirs() if (d / VADER_SDIST).is_file()), None)
    if sdist is None:
        raise DataError(f"the {name} data is not installed; fetch it with: "
                        f"{VADER_FETCH.format(dir=data_dirs()[-2])}  (or run `make setup`)")
    try:
        with tarfile.open(sdist) as outer:
            inner_bytes = outer.extractfile(VADER_ARCHIVE).read()  # type: ignore[union-attr]
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            raw = inner.extractfile(f"hutto_ICWSM_2014/{spec.member}").read()  # type: ignore[union-attr]
        return parse_ground_truth(raw.decode("utf-8"), spec.min_abs_rating)
    except (tarfile.TarError, KeyError, AttributeError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{sdist}: not the vaderSentiment 3.3.2 sdist ({e}); fetch it again with: "
                        f"{VADER_FETCH.format(dir=sdist.parent)}") from None


def movie_reviews() -> Examples:
    """The built-in sentiment set, labels `negative` / `positive`, in file order."""
    return vader_set("movie-reviews")


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


def load_examples(source: str, text_field: str = "text", label_field: str = "label", train: bool = True) -> Examples:
    """A built-in name or a labelled file. `train=True` (every training verb) refuses the test-only sets."""
    if source in BUILTIN and not Path(source).exists():
        if train and VADER_SETS[source].test_only:
            raise DataError(f"{source} is a test-only set: it measures how a classifier holds up outside its "
                            f"training domain, so it is never trained on or used for early stopping; score a "
                            f"model on it with `llmkit eval --model RUN --data {source}`")
        return vader_set(source)
    return read_labelled(source, text_field, label_field)


def eval_split(source: str, part: str = "test", text_field: str = "text", label_field: str = "label") -> Examples:
    """What `llmkit eval` scores: one part of the fixed split, or `all` rows. A test-only set is all test (no
    part of it was ever trained on), so its `test` is every row."""
    if part not in (*SPLITS, "all"):
        raise DataError(f"unknown split {part!r} for labelled data (valid: {', '.join(SPLITS)}, all)")
    test_only = source in VADER_SETS and VADER_SETS[source].test_only and not Path(source).exists()
    if test_only and part not in ("test", "all"):
        raise DataError(f"{source} is a test-only set: it has no {part} split (valid: test, all)")
    ex = load_examples(source, text_field, label_field, train=False)
    return ex if part == "all" or test_only else split(ex)[part]


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
