"""Sentence embeddings equal sentence-transformers' for all-MiniLM-L6-v2; `llmkit embed` and `llmkit search`."""

import json

import numpy as np
import pytest

from llmkit.cli.main import main
from llmkit.data.readers import read_texts
from llmkit.errors import DataError
from llmkit.interop.registry import builtin_source
from llmkit.tasks.embed import SentenceEncoder

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The new movie is awesome.",
    "The cat sits outside.", "I love pasta.", "Do you like pizza?", "The weather is lovely today!",
    "It's so sunny outside, let's go to the beach.", "He drove to the stadium.",
    "Quantum computers use qubits, which can be in superpositions of states.",
    "Résumé of a naïve café owner in Zürich.", "", "ROMEO: But soft, what light through yonder window breaks? " * 12,
]



@pytest.fixture(scope="module")
def minilm():
    return SentenceEncoder("all-minilm-l6-v2")


@pytest.mark.slow
def test_embeddings_equal_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(builtin_source("all-minilm-l6-v2")), device="cpu")
    theirs = st.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False)
    ours = minilm.encode(SENTENCES)
    assert ours.shape == theirs.shape == (20, 384)
    cos = (ours * theirs).sum(-1) / np.linalg.norm(theirs, axis=-1)  # ours are unit vectors
    assert cos.min() >= 0.9999, cos
    assert np.allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)


def test_search_cli_ranks_the_relevant_passage_first(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES[:17]) + "\n")
    rc = main(["search", "--model", "all-minilm-l6-v2", "--corpus", str(corpus), "--query", "someone plays music",
               "--query", "what is a qubit", "--top-k", "3", "--json"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0 and len(out) == 2 and len(out[0]["hits"]) == 3
    assert "violin" in out[0]["hits"][0]["text"] or "drums" in out[0]["hits"][0]["text"]
    assert "qubits" in out[1]["hits"][0]["text"]
    assert out[0]["hits"][0]["score"] >= out[0]["hits"][1]["score"] >= out[0]["hits"][2]["score"]


def test_embed_cli_npy_and_json(tmp_path, capsys):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "hello world"}\n{"text": "good night"}\n')
    rc = main(["embed", "--file", str(f), "--out", str(tmp_path / "e.npy")])
    assert rc == 0 and np.load(tmp_path / "e.npy").shape == (2, 384)
    capsys.readouterr()
    rc = main(["embed", "--text", "hello world"])
    row = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(row["embedding"]) == 384
    assert np.allclose(row["embedding"], np.load(tmp_path / "e.npy")[0], atol=1e-5)


def test_bad_inputs(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="no non-empty texts"):
        read_texts(tmp_path / "empty.txt")
    rc = main(["search", "--corpus", str(tmp_path / "nope.txt"), "--query", "x"])
    assert rc == 2 and "file not found" in capsys.readouterr().err
    rc = main(["embed", "--model", "no-such-model", "--text", "x"])
    assert rc == 2 and "model not found" in capsys.readouterr().err
