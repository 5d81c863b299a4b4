"""`llmkit federated` end to end (Flower ServerApp/ClientApp on the local engine), what travels, and bad input."""

import json

import numpy as np
import pytest

from conftest import tiny_model_config
from helpers_classify import run_cli, save_run, synthetic, tiny_bert_run, write_csv
from llmkit.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("fed") / "reviews.csv", synthetic(400))


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, corpus_file):
    return tiny_bert_run(tmp_path_factory.mktemp("bert") / "run", corpus_file)


@pytest.fixture(scope="module")
def plays(tmp_path_factory, corpus_file):
    """A few short "documents" (slices of Shakespeare), one file each, in a folder."""
    text = corpus_file.read_text()[:24_000]
    folder = tmp_path_factory.mktemp("plays")
    for i in range(6):
        (folder / f"play{i}.txt").write_text(text[i * 4000:(i + 1) * 4000])
    return folder


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tokenizer_dir):
    return save_run(tmp_path_factory.mktemp("llama") / "run", tiny_model_config("llama"),
                    Tokenizer.load(tokenizer_dir), "causal_lm")


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines()]


CLASSIFY = ("federated", "--task", "classify", "--clients", 3, "--rounds", 5, "--local-steps", 6,
            "--train.lr", "5e-3", "--data.batch_size", 16, "--quiet")


@pytest.mark.slow
def test_classify_end_to_end_and_only_weights_travel(capsys, tmp_path, bert_run, data_csv, monkeypatch):
    """A tiny BERT learns the synthetic sentiment over 4 FedAvg rounds; every reply the server receives holds only
    the trainable weights and the allowed scalars (no token ids, no texts); the final folder loads in classify."""
    import llmkit.federated.apps as apps

    seen = []
    real_check = apps.check_reply

    def spy(msg, expected):
        seen.append(msg)
        real_check(msg, expected)

    monkeypatch.setattr(apps, "check_reply", spy)
    out = tmp_path / "fed"
    rc, stdout, err = run_cli(capsys, *CLASSIFY, "--model", bert_run, "--data", data_csv, "--json", "--out", out)
    assert rc == 0, err
    summary = json.loads(stdout)
    got = rows(out)
    assert [r["round"] for r in got] == [0, 1, 2, 3, 4, 5]
    for r in got[1:]:
        assert r["clients"] == 3 and r["bytes_sent"] == r["bytes_down"] + r["bytes_up"] > 0
        assert set(r) >= {"round", "clients", "train_loss", "val_loss", "accuracy", "bytes_sent"}
    assert got[-1]["accuracy"] >= max(got[0]["accuracy"] + 0.2, 0.85), got
    assert summary["test_accuracy"] >= 0.85 and (out / "rounds.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "rounds").iterdir()) == [f"{i:03d}" for i in range(6)]

    # What reached the server: 5 rounds x 3 clients, each only `arrays` (float weights) + `metrics` (scalars).
    assert len(seen) == 15
    texts = [t for t, _ in synthetic(400)]
    for msg in seen:
        assert set(msg.content.keys()) == {"arrays", "metrics"} and not msg.content.config_records
        assert set(msg.content["metrics"]) <= apps.REPLY_METRICS
        for arr in msg.content["arrays"].values():
            assert arr.dtype == "float32"  # token ids are integers: none travel
        blob = b"".join(a.data for a in msg.content["arrays"].values())
        assert not any(t.encode() in blob for t in texts[:50])

    rc, stdout, err = run_cli(capsys, "classify", "--model", out, "--json", "--text", "a wonderful superb film",
                              "--text", "a dull tedious plot")
    assert rc == 0, err
    assert [json.loads(line)["label"] for line in stdout.splitlines()] == ["pos", "neg"]


@pytest.mark.slow
def test_dp_clips_each_update_and_reports_epsilon(capsys, tmp_path, bert_run, data_csv):
    """Server-side clipping is really applied: with negligible noise the global model moves by at most `clip`
    in a round (the average of updates clipped to `clip`); unclipped it moves far more. Epsilon grows per round."""
    from safetensors.torch import load_file

    def moved(out, rnd):
        a, b = (load_file(out / "rounds" / f"{r:03d}" / "trainable.safetensors") for r in (rnd - 1, rnd))
        return float(sum((a[k] - b[k]).pow(2).sum() for k in a) ** 0.5)

    base = ("federated", "--task", "classify", "--model", bert_run, "--data", data_csv, "--clients", 2,
            "--local-steps", 2, "--train.lr", "5e-3", "--quiet")
    rc, _, err = run_cli(capsys, *base, "--rounds", 1, "--dp", "--dp-level", "client", "--noise-multiplier", "1e-6",
                         "--clip", "0.01", "--out", tmp_path / "dp")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, *base, "--rounds", 1, "--out", tmp_path / "plain")
    assert rc == 0, err
    assert moved(tmp_path / "dp", 1) <= 0.01 + 1e-4 < 0.1 < moved(tmp_path / "plain", 1)
    rc, _, err = run_cli(capsys, *base, "--rounds", 2, "--local-steps", 1, "--dp", "--dp-level", "client",
                         "--epsilon", 50, "--federated.save_rounds", "false", "--out", tmp_path / "eps")
    assert rc == 0, err
    eps = [r["epsilon"] for r in rows(tmp_path / "eps")]
    assert eps[0] == 0 < eps[1] < eps[2] <= 50.5, eps


@pytest.mark.slow
def test_example_level_dp_trains_lora_and_each_client_accounts(capsys, tmp_path, bert_run, data_csv):
    """Per-example DP-SGD (opacus) in the clients, through the CLI: the run learns something (the weights move),
    every round reports the worst client's epsilon, which grows and stays within the budget asked for."""
    rc, out, err = run_cli(capsys, "federated", "--task", "classify", "--model", bert_run, "--data", data_csv,
                           "--clients", 2, "--rounds", 2, "--local-steps", 2, "--lora", "--dp", "--epsilon", 8,
                           "--delta", "1e-3", "--quiet", "--json", "--out", tmp_path / "ex")
    assert rc == 0, err
    got = rows(tmp_path / "ex")
    eps = [r["epsilon"] for r in got]
    assert eps[0] == 0 < eps[1] < eps[2] <= 8.1, eps
    assert all(r["delta"] == 1e-3 and r["noise_multiplier"] > 0 for r in got), got


def test_check_reply_refuses_data(bert_run):
    """The server-side guard itself: a reply carrying a ConfigRecord of texts, extra arrays (token ids) or an
    unknown figure is refused."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from llmkit.errors import DataError
    from llmkit.federated.apps import check_reply

    w = np.zeros((2, 3), dtype=np.float32)
    expected = {"w": ((2, 3), "float32")}

    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1

    def reply(content):
        msg = Message(content, reply_to=Message(RecordDict(), dst_node_id=1, message_type="train"))
        return msg

    good = RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "metrics": MetricRecord({"num-examples": 3})})
    check_reply(reply(good), expected)
    bad = [RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "metrics": MetricRecord({"num-examples": 3}),
                       "data": ConfigRecord({"texts": ["a secret review"]})}),
           RecordDict({"arrays": ArrayRecord({"w": Array(w), "ids": Array(np.arange(5))}),
                       "metrics": MetricRecord({"num-examples": 3})}),
           RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "metrics": MetricRecord({"first_token": 17})})]
    for content in bad:
        with pytest.raises(DataError):
            check_reply(reply(content), expected)


@pytest.mark.slow
def test_lm_by_document_loss_goes_down_and_loads_in_generate(capsys, tmp_path, llama_run, plays):
    out = tmp_path / "lm"
    rc, _, err = run_cli(capsys, "federated", "--task", "lm", "--model", llama_run, "--data", plays, "--clients", 3,
                         "--rounds", 2, "--local-steps", 4, "--split", "by-document", "--strategy", "fedprox",
                         "--mu", 0.01, "--lora", "--train.lr", "3e-3", "--finetune.max_length", 32,
                         "--data.batch_size", 8, "--quiet", "--out", out)
    assert rc == 0, err
    got = rows(out)
    assert got[-1]["val_loss"] < got[0]["val_loss"], got
    assert all("perplexity" in r for r in got)
    rc, stdout, err = run_cli(capsys, "generate", "--model", out, "--max-new-tokens", 5, "--prompt", "ROMEO:")
    assert rc == 0, err


@pytest.mark.parametrize("args, msg", [
    (("--clients", 5000), "client"),
    (("--split", "dirichlet", "--alpha", 0), "alpha"),
    (("--fraction", 0), "fraction"),
    (("--dp", "--epsilon", 0), "epsilon"),
    (("--dp", "--epsilon", -1), "epsilon"),
])
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, bert_run, data_csv, args, msg):
    out = tmp_path / "never"
    rc, _, err = run_cli(capsys, "federated", "--task", "classify", "--model", bert_run, "--data", data_csv,
                         "--rounds", 1, "--out", out, *args)
    assert rc == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and msg in err, err
    assert not out.exists()
