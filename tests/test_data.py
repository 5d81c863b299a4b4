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
