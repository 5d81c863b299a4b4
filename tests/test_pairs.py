"""Parallel pairs: the built-in KJV -> WEB corpus (alignment, verse numbers stripped, split by book) and user pair
files (JSONL / TSV, one-line errors naming file, line and field)."""

from __future__ import annotations

import csv
import json
import re

import pytest

from llmkit.data.pairs import (
    BIBLE_SPLITS,
    BIBLE_VERSES,
    BOOKS,
    load_pairs,
    parse_bible_file,
    sft_prompt,
)
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import DataError


@pytest.fixture(scope="module")
def bible():
    return {split: load_pairs("bible-kjv-web", split) for split in ("train", "validation", "test", "all")}


def book(ref: str) -> str:
    return ref.split()[0]


def test_every_verse_is_paired_once_and_the_splits_cover_it(bible):
    assert len(BOOKS) == 66
    assert len(bible["all"]) == BIBLE_VERSES == 31_102
    refs = [p.ref for p in bible["all"]]
    assert len(set(refs)) == len(refs)
    assert sum(len(bible[s]) for s in ("train", "validation", "test")) == len(bible["all"])
    assert (len(bible["validation"]), len(bible["test"])) == (767, 1115)
    for split in ("validation", "test"):  # a few per cent each
        assert 0.01 < len(bible[split]) / len(bible["all"]) < 0.06


def test_no_book_is_in_two_splits(bible):
    books = {s: {book(p.ref) for p in bible[s]} for s in ("train", "validation", "test")}
    assert books["validation"] == set(BIBLE_SPLITS["validation"])
    assert books["test"] == set(BIBLE_SPLITS["test"])
    assert not books["train"] & books["validation"] and not books["train"] & books["test"]
    assert not books["validation"] & books["test"]
    assert len(books["train"]) == 66 - 4


def test_known_verses_both_sides(bible):
    by_ref = {p.ref: p for p in bible["all"]}
    jn = by_ref["JHN 3:16"]
    assert jn.source == ("For God so loved the world, that he gave his only begotten Son, that whosoever believeth "
                         "in him should not perish, but have everlasting life.")
    assert jn.target == ("For God so loved the world, that he gave his one and only Son, that whoever believes in "
                         "him should not perish, but have eternal life.")
    assert by_ref["GEN 1:1"].source == "In the beginning God created the heaven and the earth."
    assert by_ref["GEN 1:1"].target == "In the beginning God created the heavens and the earth."
    assert by_ref["ACT 1:1"] in bible["test"]
    # The WEB numbers Romans' doxology 14:24-26; it is paired with the KJV's 16:25-27.
    assert by_ref["ROM 16:27"].target.startswith("to the only wise God")
    assert "ROM 14:24" not in by_ref


def test_verse_numbers_and_markup_are_stripped(bible):
    for p in bible["all"]:
        for side in (p.source, p.target):
            assert side and side == side.strip()
            assert not re.match(r"\d+\.", side), (p.ref, side[:30])
            assert "[" not in side and "`" not in side and "\u2019" not in side and "  " not in side


def _fake_bible(path, starts_shift: int = 0):
    text = "\n1. In the beginning. 2. And [then] the end.\n1. Again."
    starts = {1001001: 1, 1001002: 21, 1001002 + 1000 - 1: 45}
    ends = {1001001: 21, 1001002: 44, 1001002 + 1000 - 1: 54}
    starts = {k: v + starts_shift for k, v in starts.items()}
    path.write_text(f'bible = Bible(Version.X, """{text}""", {starts!r}, {ends!r}, {{}}, {{}}, {{}}, False,)\n',
                    encoding="utf-8")
    return path


def test_alignment_is_verified_not_assumed(tmp_path):
    verses = parse_bible_file(_fake_bible(tmp_path / "ok.py"))
    assert verses == {1001001: "In the beginning.", 1001002: "And then the end.", 1002001: "Again."}
    with pytest.raises(DataError, match=r"GEN 1:1 .*does not start with its number 1.*do not align"):
        parse_bible_file(_fake_bible(tmp_path / "drift.py", starts_shift=3))
    # Off by a whole verse: the slice starts with a number, but another verse's.
    off = (tmp_path / "ok.py").read_text(encoding="utf-8").replace("1001002: 21", "1001002: 1")
    (tmp_path / "off.py").write_text(off, encoding="utf-8")
    with pytest.raises(DataError, match=r"GEN 1:2 .*does not start with its number 2 \(it starts '1\. In"):
        parse_bible_file(tmp_path / "off.py")


# --------------------------------------------------------------------------------------------- user files


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def rows(n):
    return [{"source": f"thou art number {i}", "target": f"you are number {i}"} for i in range(n)]


def test_jsonl_and_tsv_files_split_80_10_10(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", rows(50))
    parts = {s: load_pairs(f, s) for s in ("train", "validation", "test", "all")}
    assert [len(parts[s]) for s in ("train", "validation", "test", "all")] == [40, 5, 5, 50]
    seen = [p.ref for s in ("train", "validation", "test") for p in parts[s]]
    assert sorted(seen) == sorted(p.ref for p in parts["all"])  # disjoint, complete
    assert parts["all"][3].source == "thou art number 3" and parts["all"][3].ref == "p.jsonl:4"
    assert load_pairs(f, "val") == parts["validation"]

    t = tmp_path / "p.tsv"
    with t.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["kjv", "web"])
        w.writerows([['"Go forth," he said', "He said, \"Go\"\tnow"]] + [[r["source"], r["target"]] for r in rows(9)])
    got = load_pairs(t, "all", source_field="kjv", target_field="web")
    assert got[0].source == '"Go forth," he said' and got[0].target == 'He said, "Go"\tnow'


@pytest.mark.parametrize("record,message", [
    ({"source": "a"}, r"p\.jsonl:3: no 'target' field .*--finetune\.target_field"),
    ({"target": "b"}, r"p\.jsonl:3: no 'source' field"),
    ({"source": "a", "target": "  "}, r"p\.jsonl:3: field 'target' is empty"),
    ({"source": "", "target": "b"}, r"p\.jsonl:3: field 'source' is empty"),
    ({"source": "a", "target": 7}, r"p\.jsonl:3: field 'target' must be a string, got int"),
])
def test_bad_jsonl_pair_is_one_line_naming_file_line_and_field(tmp_path, record, message):
    f = write_jsonl(tmp_path / "p.jsonl", [*rows(2), record, *rows(10)])
    with pytest.raises(DataError, match=message) as e:
        load_pairs(f, "all")
    assert "\n" not in str(e.value)


def test_bad_tsv_and_paths(tmp_path):
    t = tmp_path / "p.tsv"
    t.write_text("source\ttext\na\tb\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p\.tsv: no 'target' column .*--finetune\.target_field"):
        load_pairs(t, "all")
    t.write_text("source\ttarget\na\tb\nc\t\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p\.tsv:3: field 'target' is empty"):
        load_pairs(t, "all")
    with pytest.raises(DataError, match="neither a file nor a built-in pair corpus"):
        load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "p.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"unknown pair file format '\.txt'"):
        load_pairs(tmp_path / "p.txt")
    with pytest.raises(DataError, match="at least 10 are needed"):
        load_pairs(write_jsonl(tmp_path / "few.jsonl", rows(4)), "train")
    with pytest.raises(DataError, match="unknown split 'dev2'"):
        load_pairs("bible-kjv-web", "dev2")


def test_sft_prompt_is_the_chat_template_with_the_instruction(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    prompt = sft_prompt(tok, "Thou art.", "Rewrite:")
    assert prompt == "<|im_start|>user\nRewrite:\n\nThou art.<|im_end|>\n<|im_start|>assistant\n"
