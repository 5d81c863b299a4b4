"""The historical baselines: the Kneser–Ney n-gram model and the LSTM language model (`model.arch: lstm`)."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from llmkit.baselines.ngram import KneserNey, fit_and_score
from llmkit.cli.main import main
from llmkit.config import ModelConfig
from llmkit.data.shards import load_meta
from llmkit.errors import ConfigError
from llmkit.model import build_model, empty_model


def test_kn_probabilities_sum_to_one_over_the_vocabulary():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 6, 400)  # tokens 6..8 of the 9-token vocabulary never occur
    for order in (1, 2, 3, 5):
        lm = KneserNey(order, 9).fit(tokens)
        for context in ([], [1], [2, 3], [4, 4, 4, 4], [8, 7], [0, 1, 2, 3, 4, 5]):
            p = lm.next_token_probs(context)
            assert p.shape == (9,) and (p > 0).all(), (order, context)
            assert p.sum() == pytest.approx(1.0, abs=1e-12), (order, context)


def brute_force_kn(tokens: list[int], order: int, vocab: int, context: list[int], word: int) -> float:
    """Interpolated modified Kneser–Ney straight from the formulas, with dictionaries: the reference."""
    grams = [Counter(tuple(tokens[i - k + 1:i + 1]) for i in range(k - 1, len(tokens))) for k in range(1, order + 1)]
    counts = []
    for k in range(1, order + 1):
        if k == order:
            counts.append(dict(grams[k - 1]))
        else:  # continuation counts: distinct left neighbours
            left = defaultdict(set)
            for g in grams[k]:
                left[g[1:]].add(g[0])
            counts.append({g: len(left[g]) for g in grams[k - 1]})

    def discounts(c: dict) -> list[float]:
        n = Counter(min(v, 5) for v in c.values())
        n1, n2, n3, n4 = (n[i] for i in (1, 2, 3, 4))
        if min(n1, n2, n3, n4) > 0:
            y = n1 / (n1 + 2 * n2)
            d = [0.0, 1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3]
            if all(0 < d[i] < i for i in (1, 2, 3)):
                return d
        return [0.0, 0.75, 0.75, 0.75]

    p = 1.0 / vocab
    for k in range(1, order + 1):
        h = tuple(context[len(context) - (k - 1):]) if k > 1 else ()
        if k > 1 and len(context) < k - 1:
            continue
        c, d = counts[k - 1], discounts(counts[k - 1])
        children = {g: v for g, v in c.items() if g[:-1] == h and v > 0}
        total = sum(children.values())
        if total == 0:
            continue
        mass = sum(d[min(v, 3)] for v in children.values())
        a = children.get(h + (word,), 0)
        p = (max(a - d[min(a, 3)], 0.0) + mass * p) / total
    return p


def test_kn_equals_the_formulas_computed_by_hand():
    rng = np.random.default_rng(1)
    tokens = [int(x) for x in rng.integers(0, 5, 120)] + [0, 1, 2, 0, 1, 2, 0, 1, 2]
    for order in (2, 3, 4):
        lm = KneserNey(order, 6).fit(np.array(tokens))
        for context in ([0, 1], [2, 0, 1], [4, 4, 4], [5, 5], [1]):
            got = lm.next_token_probs(context)
            want = [brute_force_kn(tokens, order, 6, context, w) for w in range(6)]
            np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=f"order {order}, context {context}")


def test_log_probs_score_each_token_given_its_context():
    tokens = np.random.default_rng(2).integers(0, 7, 200)
    lm = KneserNey(3, 7).fit(tokens)
    lp = lm.log_probs(tokens[:40])
    assert lp.shape == (39,)
    want = [math.log(lm.next_token_probs(tokens[:i])[tokens[i]]) for i in range(1, 40)]
    np.testing.assert_allclose(lp, want, rtol=1e-12)


def test_higher_order_wins_on_repetitive_text():
    rng = np.random.default_rng(3)
    phrase = list(rng.integers(0, 50, 12))
    stream = np.array((phrase + [int(rng.integers(0, 50))]) * 60)  # a refrain with one random token each time
    train, heldout = stream[:600], stream[600:]
    loss = {o: -KneserNey(o, 50).fit(train).log_probs(heldout).mean() for o in (1, 5)}
    assert loss[5] < 0.3 * loss[1], loss  # the 5-gram has learned the refrain; a unigram cannot


def test_bad_orders_and_tokens_are_errors():
    with pytest.raises(ConfigError, match="--order: must be between 1 and 10"):
        KneserNey(0, 5)
    with pytest.raises(Exception, match=r"token ids must lie in \[0, 5\)"):
        KneserNey(2, 5).fit(np.array([1, 2, 9]))


def test_ngram_verb_reports_bits_per_byte_like_eval(data_dir, capsys):
    assert main(["ngram", "--data", str(data_dir), "--order", "1", "--order", "3", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    meta = load_meta(data_dir)
    assert [r["order"] for r in rows] == [1, 3]
    for r in rows:  # the denominator of `llmkit eval`: every token's share of the split's bytes
        assert r["bytes"] == meta["splits"]["val"]["bytes"] and r["tokens"] == meta["splits"]["val"]["tokens"]
        assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2) * r["tokens"] / r["bytes"])
    assert rows[1]["bits_per_byte"] < rows[0]["bits_per_byte"]
    assert fit_and_score(data_dir, 2, max_train_tokens=1000)["train_tokens"] == 1000


# ------------------------------------------------------------------------------------------------- LSTM

def tiny_lstm() -> ModelConfig:
    return ModelConfig(arch="lstm", n_layer=2, n_head=1, n_embd=32, block_size=32, vocab_size=97)


def test_lstm_decoding_state_and_left_padding_match_a_full_pass():
    model = build_model(tiny_lstm()).eval()
    ids = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        full = model(ids).logits  # (B, T, V)
        cache = model.new_cache(3, 20)
        parts = [model(ids[:, :11], cache=cache).logits, model(ids[:, 11:], cache=cache).logits]
        torch.testing.assert_close(torch.cat(parts, 1), full)
        mask = torch.ones(3, 20, dtype=torch.long)
        mask[0, :6] = 0  # row 0 is left-padded: it must compute what it would alone
        padded = model(ids, attention_mask_2d=mask, cache=model.new_cache(3, 20)).logits
        torch.testing.assert_close(padded[0, 6:], model(ids[:1, 6:]).logits[0], atol=1e-5, rtol=1e-5)
        empty = empty_model(tiny_lstm())
        empty.load_state_dict(model.state_dict(), assign=True)
        torch.testing.assert_close(empty.eval()(ids).logits, full)


@pytest.mark.slow
def test_lstm_trains_through_the_loop_and_loads_for_eval_and_generate(data_dir, tmp_path, capsys):
    run, config = tmp_path / "lstm", tmp_path / "lstm.yaml"
    config.write_text(f"""model: {{arch: lstm, n_layer: 1, n_head: 1, n_embd: 64, block_size: 32}}
data: {{path: {data_dir}, batch_size: 8}}
train: {{max_steps: 40, warmup_steps: 5, lr: 0.01, eval_interval: 20, eval_iters: 2, log_interval: 5,
         dtype: float32, device: cpu}}
""")
    argv = ["pretrain", "--config", str(config), "--out", str(run)]
    assert main(argv) == 0
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r and "val_loss" not in r]
    assert losses[-1] < losses[0] - 1.0, losses  # from ~ln(512) = 6.2 down
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--data", str(data_dir), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0 < res["bits_per_byte"] < 4 and res["context"] == 32
    val = [r["val_loss"] for r in logged if "val_loss" in r]
    assert res["loss"] == pytest.approx(min(val), rel=0.15)  # the whole split vs the loop's sample of it
    assert main(["generate", "--model", str(run), "--prompt", "ROMEO:", "--prompt", "KING HENRY:",
                 "--max-new-tokens", "8", "--temperature", "0", "--json"]) == 0
    outs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(outs) == 2 and all(o["tokens"] == 8 or o["finish_reason"] == "eos" for o in outs)
