import json

import numpy as np
import pytest

from llmkit.data.batches import TokenBatches
from llmkit.data.shards import load_tokens, prepare
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import DataError


def test_prepare_counts_tokens_and_bytes(data_dir, corpus_file, tokenizer_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    assert tr["bytes"] + va["bytes"] == len(corpus_file.read_bytes())
    assert 0.05 < va["tokens"] / (tr["tokens"] + va["tokens"]) < 0.2
    assert meta["dtype"] == "uint16"
    train = load_tokens(data_dir, "train")
    assert len(train) == tr["tokens"]
    tok = Tokenizer.load(data_dir / "tokenizer")
    # The shards hold exactly the tokenizer's encoding: decoding the first chunk gives the text back.
    first_chunk = tok.decode(train[:2000].tolist())
    assert corpus_file.read_text().startswith(first_chunk)


def test_prepare_folder_and_jsonl(tmp_path, tokenizer_dir):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("To be, or not to be, that is the question.\n" * 50)
    (folder / "b.md").write_text("Whether 'tis nobler in the mind to suffer.\n" * 50)
    meta = prepare(str(folder), tokenizer_dir, tmp_path / "out1", quiet=True)
    assert meta["documents"] == 2 and meta["splits"]["val"]["tokens"] > 0
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"body": f"line {i} of the play"}) for i in range(200)))
    meta = prepare(str(jl), tokenizer_dir, tmp_path / "out2", text_field="body", quiet=True)
    assert meta["documents"] == 200
    eos = meta["eos_id"]
    both = np.concatenate([load_tokens(tmp_path / "out2", s) for s in ("train", "val")])
    assert (both == eos).sum() == 200  # one separator per document


def test_prepare_bad_input_is_a_clear_error(tmp_path, tokenizer_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(DataError, match="empty"):
        prepare(str(empty), tokenizer_dir, tmp_path / "o", quiet=True)
    with pytest.raises(DataError, match="neither a file"):
        prepare(str(tmp_path / "nope.txt"), tokenizer_dir, tmp_path / "o", quiet=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no 'text' field"):
        prepare(str(bad), tokenizer_dir, tmp_path / "o", quiet=True)
    assert not list((tmp_path / "o").glob("*.bin*"))  # nothing half-written


def test_truncated_shard_is_detected(tmp_path, data_dir):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(data_dir, copy)
    raw = (copy / "val.bin").read_bytes()
    (copy / "val.bin").write_bytes(raw[:-10])
    with pytest.raises(DataError, match="truncated"):
        load_tokens(copy, "val")


def test_batches_are_deterministic_and_resumable(data_dir):
    a = TokenBatches(data_dir, "train", block_size=32, batch_size=4, seed=7)
    first = [next(a) for _ in range(5)]
    state = a.state_dict()
    after = [next(a) for _ in range(30)]  # crosses an epoch boundary on this small split
    b = TokenBatches(data_dir, "train", block_size=32, batch_size=4, seed=7)
    b.load_state_dict(state)
    for x, y in zip(after, [next(b) for _ in range(30)]):
        assert (x["input_ids"] == y["input_ids"]).all()
    c = TokenBatches(data_dir, "train", block_size=32, batch_size=4, seed=7)
    assert all((x["input_ids"] == next(c)["input_ids"]).all() for x in first)
    batch = first[0]
    assert batch["input_ids"].shape == (4, 32)
    assert (batch["input_ids"][:, 1:] == batch["labels"][:, :-1]).all()


def test_ranks_get_disjoint_slices(data_dir):
    r0 = TokenBatches(data_dir, "train", 32, 4, seed=1, rank=0, world=2)
    r1 = TokenBatches(data_dir, "train", 32, 4, seed=1, rank=1, world=2)
    one = TokenBatches(data_dir, "train", 32, 8, seed=1)
    x0, x1, full = next(r0)["input_ids"], next(r1)["input_ids"], next(one)["input_ids"]
    assert (full[:4] == x0).all() and (full[4:] == x1).all()


# ------------------------------------------------------------------------------------- streamed prepare


def _whole_text_shards(text: str, tok: Tokenizer, val_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """The shards of a one-document corpus the pre-streaming way: the whole text in memory, cut into ~32 KB
    chunks at line breaks, every k-th chunk to validation, EOS after the last."""
    chunks, start = [], 0
    while start < len(text):
        end = text.find("\n", start + 32 * 1024)
        end = len(text) if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    every = max(2, round(1 / val_fraction))
    out: dict[str, list[int]] = {"train": [], "val": []}
    for i, chunk in enumerate(chunks):
        out["val" if i % every == every - 1 else "train"] += tok.encode(chunk) + ([tok.eos_id] if i == len(chunks) - 1
                                                                               else [])
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("piece_bytes", [1000, 50_000])
def test_streamed_prepare_gives_the_shards_of_the_whole_text(tmp_path, tokenizer_dir, corpus_file, monkeypatch,
                                                            piece_bytes):
    """A file many pieces long, with multi-byte characters across piece boundaries, gives exactly the shards of
    tokenizing the whole text (pieces smaller and larger than a chunk)."""
    import llmkit.data.readers

    monkeypatch.setattr(llmkit.data.readers, "PIECE_BYTES", piece_bytes)
    text = 2 * corpus_file.read_text().replace("e", "é").replace("o", "😀")  # 2- and 4-byte characters
    src = tmp_path / "big.txt"
    src.write_text(text, encoding="utf-8")
    assert src.stat().st_size > 4 * piece_bytes
    meta = prepare(str(src), tokenizer_dir, tmp_path / "out", quiet=True)
    expected = _whole_text_shards(text, Tokenizer.load(tokenizer_dir))
    assert len(expected["val"]) > 0  # enough chunks for a real validation split (no tail moved)
    for split in ("train", "val"):
        assert np.array_equal(load_tokens(tmp_path / "out", split), expected[split]), split
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == src.stat().st_size


def test_prepare_memory_does_not_grow_with_the_file(tmp_path, tokenizer_dir, monkeypatch):
    """A 20 MB file is read in pieces: Python's peak memory stays a fraction of the file's size (the tokenizer
    is stubbed out: its speed is not under test, and its memory is Rust's)."""
    import tracemalloc

    monkeypatch.setattr(Tokenizer, "encode_batch", lambda self, texts: [[1, 2, 3]] * len(texts))
    src = tmp_path / "big.txt"
    with src.open("w", encoding="utf-8") as f:
        for _ in range(21):
            f.write(("To be, or not to be, that is the question. Ç'est la vie.\n" * 17_000)[:1_000_000])
    tracemalloc.start()
    try:
        meta = prepare(str(src), tokenizer_dir, tmp_path / "out", quiet=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == src.stat().st_size > 20e6
    assert peak < src.stat().st_size / 2, f"peak {peak / 1e6:.1f} MB for a {src.stat().st_size / 1e6:.0f} MB file"


def test_invalid_utf8_and_byte_order_marks(tmp_path, tokenizer_dir):
    """Invalid UTF-8 is a one-line error with the file and byte offset (also past the first piece); a BOM is
    dropped, not taken for text or for part of the first column's name."""
    from llmkit.data.labelled import read_labelled
    from llmkit.data.readers import read_texts

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\n" * 150_000 + b"caf\xe9\n")  # the bad byte is in the second 1 MB piece
    with pytest.raises(DataError, match=r"bad.txt: not UTF-8 text \(invalid byte at offset 1500003\)"):
        prepare(str(bad), tokenizer_dir, tmp_path / "o", quiet=True)
    jl = tmp_path / "bad.jsonl"
    jl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not UTF-8 text \(invalid byte at offset 28\)"):
        prepare(str(jl), tokenizer_dir, tmp_path / "o", quiet=True)
    csv_bad = tmp_path / "bad.csv"
    csv_bad.write_bytes(b"text,label\ncaf\xe9,a\n")
    with pytest.raises(DataError, match="bad.csv.*not UTF-8"):
        read_labelled(csv_bad)
    rows = "".join(f"review {i},{'pos' if i % 2 else 'neg'}\n" for i in range(12))
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbftext,label\n" + rows.encode())
    assert read_labelled(bom).texts[0] == "review 0"
    assert read_texts(bom)[0] == "review 0"
    bom_jl = tmp_path / "bom.jsonl"
    bom_jl.write_bytes(b'\xef\xbb\xbf{"text": "hello there"}\n')
    assert read_texts(bom_jl) == ["hello there"]
    bom_txt = tmp_path / "bom.txt"
    bom_txt.write_bytes(b"\xef\xbb\xbfTo be, or not to be\n" * 40)
    meta = prepare(str(bom_txt), tokenizer_dir, tmp_path / "bom_out", quiet=True)
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == bom_txt.stat().st_size - 3


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable JSON file"),
    ('{"dtype": "uint16"}', "not a meta.json written by `llmkit prepare`"),
    ('{"dtype": "float64", "vocab_size": 5, "splits": {"train": {"tokens": 1, "bytes": 1}, '
     '"val": {"tokens": 1, "bytes": 1}}}', "needs dtype uint16/uint32"),
])
def test_corrupt_meta_json_is_a_clear_error(tmp_path, data_dir, content, message):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(data_dir, copy)
    (copy / "meta.json").write_text(content)
    with pytest.raises(DataError, match=f"meta.json: .*{message}"):
        TokenBatches(copy, "train", block_size=32, batch_size=4)


def test_unknown_split_and_oversized_batch(data_dir):
    with pytest.raises(DataError, match="no split 'tset'"):
        load_tokens(data_dir, "tset")
    with pytest.raises(DataError, match="lower data.batch_size"):
        TokenBatches(data_dir, "val", block_size=64, batch_size=100_000)


def test_tokenizer_training_text_cuts_giant_words(tmp_path):
    """BPE training time grows with the square of a word's length: a 300 K-character line without spaces is fed
    to the trainer in words of at most 1,000 characters (it took minutes; now well under a second)."""
    from llmkit.data.shards import iter_texts

    src = tmp_path / "one-line.txt"
    src.write_text("short words first\n" + "x" * 300_000 + "\n")
    texts = list(iter_texts(str(src)))
    assert max(len(w) for t in texts for w in t.split()) == 1000
    assert "".join(texts).replace("\n", "") == src.read_text().replace("\n", "")
