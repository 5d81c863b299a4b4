"""A classifier that holds up outside its domain: the VADER sets' label rule, the test-only guard, seeded
augmentation that never touches evaluation texts, domain mixing, `llmkit eval` of a classifier."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from helpers_classify import run_cli, synthetic, tiny_bert_run, write_csv
from llmkit.data import augment
from llmkit.data.augment import AugmentedBatches, augment_texts
from llmkit.data.batches import LabelledBatches
from llmkit.data.labelled import VADER_SDIST, eval_split, load_examples, parse_ground_truth, split, vader_set
from llmkit.errors import DataError

GROUND_TRUTH = "\n".join([
    "1_1\t0.4\tfactual, weakly positive",        # |r| < 0.5: dropped from the 0.5-rule sets
    "1_2\t-0.5\texactly on the cut: negative",   # |r| = 0.5: kept
    "1_3\t0\trated exactly zero",                # dropped by every rule
    "1_4\t2.726315789\tso lucky, love it",       # positive
    "1_5\t-3.1\tawful, hateful",                 # negative
    "1_6\t-0.45\tfactual, weakly negative",      # dropped from the 0.5-rule sets
    "broken line without tabs",                  # malformed: skipped
    "1_7\t1.2\t   ",                             # empty text: skipped
    "1_8\tn/a\tnot a rating",                    # unreadable rating: skipped
])


def test_label_rule_is_sign_of_mean_with_the_cut():
    cut = parse_ground_truth(GROUND_TRUTH, 0.5)
    assert cut.texts == ["exactly on the cut: negative", "so lucky, love it", "awful, hateful"]
    assert cut.labels == ["negative", "positive", "negative"]
    every = parse_ground_truth(GROUND_TRUTH, 0.0)  # movie-reviews' rule: every rating but an exact 0
    assert every.labels == ["positive", "negative", "positive", "negative", "negative"]
    assert "rated exactly zero" not in every.texts


@pytest.fixture
def fake_sdist(tmp_path, monkeypatch):
    """A vaderSentiment sdist holding the nested hutto_ICWSM_2014 archive with the four ground-truth files."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for member in ("movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets", "tweets"):
            data = f"{GROUND_TRUTH}\n9\t0.3\t{member} neutral\n10\t1.5\t{member} positive\n".encode()
            info = tarfile.TarInfo(f"hutto_ICWSM_2014/{member}_GroundTruth.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "share").mkdir()
    with tarfile.open(tmp_path / "share" / VADER_SDIST, "w:gz") as tar:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    monkeypatch.setattr("llmkit.data.labelled.data_dirs", lambda: [tmp_path / "share", tmp_path / "cache"])


def test_one_reader_for_all_four_sets(fake_sdist):
    movie, tweets = vader_set("movie-reviews"), vader_set("vader-tweets")
    assert "movieReviewSnippets neutral" in movie.texts  # 0.3 kept: the movie set's rule is "not exactly 0"
    assert tweets.texts[-1] == "tweets positive" and "tweets neutral" not in tweets.texts
    assert vader_set("vader-nyt").labels == ["negative", "positive", "negative", "positive"]
    assert len(load_examples("vader-amazon")) == 4  # the domain a user has: trainable


def test_test_only_sets_are_refused_for_training_and_all_test_for_eval(fake_sdist):
    for name in ("vader-nyt", "vader-tweets"):
        with pytest.raises(DataError, match=f"{name} is a test-only set"):
            load_examples(name)
        assert eval_split(name).texts == vader_set(name).texts  # its test split is every row
        with pytest.raises(DataError, match="has no val split"):
            eval_split(name, "val")
    assert len(eval_split("vader-amazon", "all")) == 4


def test_real_sets_have_the_documented_sizes():
    try:
        sizes = {name: len(vader_set(name)) for name in ("vader-amazon", "vader-nyt", "vader-tweets")}
    except DataError as e:
        pytest.skip(str(e))
    assert sizes == {"vader-amazon": 2985, "vader-nyt": 2970, "vader-tweets": 3432}


# --------------------------------------------------------------------------------------------- augmentation

TEXTS = [f"word{i} " + " ".join(f"w{i}_{j}" for j in range(12)) for i in range(40)]


def test_augmentation_is_seeded_and_only_edits_words():
    a = augment_texts(TEXTS, ["word_dropout", "word_swap"], 0.2, np.random.default_rng(7))
    b = augment_texts(TEXTS, ["word_dropout", "word_swap"], 0.2, np.random.default_rng(7))
    c = augment_texts(TEXTS, ["word_dropout", "word_swap"], 0.2, np.random.default_rng(8))
    assert a == b and a != c and a != TEXTS
    swapped = augment_texts(TEXTS, ["word_swap"], 0.5, np.random.default_rng(0))
    assert all(sorted(s.split()) == sorted(t.split()) for s, t in zip(swapped, TEXTS)) and swapped != TEXTS
    dropped = augment_texts(TEXTS, ["word_dropout"], 0.5, np.random.default_rng(0))
    assert all(set(d.split()) <= set(t.split()) and 1 <= len(d.split()) < 13 for d, t in zip(dropped, TEXTS))
    assert augment_texts(["one", ""], ["word_dropout"], 0.5, np.random.default_rng(0)) == ["one", ""]


def test_augmented_batches_keep_the_order_and_resume_exactly():
    labels = [i % 2 for i in range(len(TEXTS))]
    ids = [[1] * len(t.split()) for t in TEXTS]

    def encode(texts):
        return [[len(w) for w in t.split()] for t in texts]

    def make():
        return AugmentedBatches(ids, TEXTS, labels, encode, 8, 0, ["word_dropout", "word_swap"], 0.3, seed=3)

    plain = LabelledBatches(ids, labels, 8, 0, seed=3)
    first, again, reference = make(), make(), [next(plain) for _ in range(7)]
    got = [next(first) for _ in range(7)]  # crosses an epoch boundary
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(got, reference))  # the unaugmented order
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(got, [next(again) for _ in range(7)]))
    resumed = make()
    state = first.state_dict()
    want = [next(first) for _ in range(3)]
    resumed.load_state_dict(state)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(want, [next(resumed) for _ in range(3)]))


# --------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, corpus_file):
    return tiny_bert_run(tmp_path_factory.mktemp("bert") / "run", corpus_file)


@pytest.mark.parametrize("flags, says", [
    (["--finetune.augment", "word_drop"], "finetune.augment: must be one of word_dropout, word_swap, got 'word_drop'"),
    (["--finetune.augment", "word_swap", "--finetune.augment_p", "0.9"], "finetune.augment_p: must be in (0, 0.5]"),
    (["--finetune.dropout", "1.5"], "finetune.dropout: must be in [0, 1)"),
    (["--finetune.mix", "vader-tweets"], "vader-tweets is a test-only set"),
    (["--finetune.mix", "missing.csv"], "dataset not found: 'missing.csv'"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, bert_run, flags, says):
    data = write_csv(tmp_path / "d.csv", synthetic(40))
    rc, _, err = run_cli(capsys, "finetune", "--model", bert_run, "--data", data, "--out", tmp_path / "o", *flags)
    assert rc == 2 and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_test_only_data_and_other_tasks_are_refused(tmp_path, capsys, bert_run):
    rc, _, err = run_cli(capsys, "finetune", "--model", bert_run, "--data", "vader-nyt", "--out", tmp_path / "o")
    assert rc == 2 and "vader-nyt is a test-only set" in err and "llmkit eval" in err
    rc, _, err = run_cli(capsys, "finetune", "--task", "sft", "--model", bert_run, "--data", "x.jsonl",
                         "--out", tmp_path / "o", "--finetune.augment", "word_swap")
    assert rc == 2 and "finetune.augment: applies to --task classify only" in err


@pytest.mark.slow
def test_finetune_with_remedies_then_eval(tmp_path, capsys, bert_run, monkeypatch):
    rows = synthetic(240)
    main = write_csv(tmp_path / "main.csv", [(f"{t} r{i}", y) for i, (t, y) in enumerate(rows[:160])])
    other = write_csv(tmp_path / "other.csv", [(f"{t} o{i}", y) for i, (t, y) in enumerate(rows[160:])])
    edited: list[str] = []

    def recording(texts, ops, p, rng):
        edited.extend(texts)
        return augment_texts(texts, ops, p, rng)

    monkeypatch.setattr(augment, "augment_texts", recording)
    out = tmp_path / "clf"
    rc, _, err = run_cli(capsys, "finetune", "--model", bert_run, "--data", main, "--out", out, "--quiet",
                         "--max-steps", "30", "--train.lr", "3e-3", "--train.eval_interval", "10",
                         "--data.batch_size", "16", "--train.device", "cpu", "--train.dtype", "float32",
                         "--finetune.augment", "word_dropout,word_swap", "--finetune.augment_p", "0.2",
                         "--finetune.dropout", "0.1", "--finetune.mix", other)
    assert rc == 0, err
    report = json.loads((out / "eval.json").read_text())
    main_parts, other_parts = split(load_examples(str(main))), split(load_examples(str(other)))
    train = set(main_parts["train"].texts) | set(other_parts["train"].texts)
    held = {t for p in (main_parts, other_parts) for k in ("val", "test") for t in p[k].texts}
    assert edited and set(edited) <= train and not set(edited) & held  # only training texts are edited
    assert len(set(edited) & set(other_parts["train"].texts)) > 0  # the mixed-in domain is trained on
    assert report["n_train"] == len(train) and report["n_test"] == len(main_parts["test"]) == 16
    assert report["augment"] == ["word_dropout", "word_swap"] and report["dropout"] == 0.1
    assert set(report["mix"]) == {str(other)} and report["mix"][str(other)]["n_test"] == 8
    # `llmkit eval` picks the classify task by itself and scores the same test split the same way
    rc, stdout, err = run_cli(capsys, "eval", "--model", out, "--data", main, "--json")
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["split"] == "test" and res["n_test"] == 16 and res["accuracy"] == report["accuracy"]
    rc, stdout, _ = run_cli(capsys, "eval", "--model", out, "--data", other, "--split", "all")
    assert rc == 0 and stdout.startswith(f"{other} (all, 80 texts): accuracy ")
    rc, _, err = run_cli(capsys, "eval", "--model", out, "--data", main, "--split", "dev")
    assert rc == 2 and "unknown split 'dev'" in err


def test_set_dropout_reaches_every_dropout_of_the_backbone():
    from conftest import tiny_model_config
    from llmkit.model import build_model
    from llmkit.tasks.finetune import set_dropout

    model = build_model(tiny_model_config("bert"))
    set_dropout(model, 0.3)
    drops = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    attn = [m.attn_dropout for m in model.modules() if hasattr(m, "attn_dropout")]
    assert drops and attn and set(drops) == set(attn) == {0.3}
    x = torch.randint(0, model.cfg.vocab_size, (2, 8))
    model.train()
    assert not torch.equal(model(x).hidden, model(x).hidden)  # dropout is live while training
    model.eval()
    assert torch.equal(model(x).hidden, model(x).hidden)
