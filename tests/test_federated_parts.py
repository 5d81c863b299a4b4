"""The federated parts below Flower: partitions, the clients' data, a local update (FedAvg / FedProx), clipping,
noise and the privacy accountant, and their one-line errors."""

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import tiny_model_config
from helpers_classify import save_run, synthetic, tiny_bert_run, write_csv
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import CheckpointError, ConfigError, DataError
from llmkit.federated.client import (
    build_model,
    evaluate_global,
    load_trainable,
    local_steps,
    local_update,
    trainable_state,
)
from llmkit.federated.config import federated_config
from llmkit.federated.data import load_federated_data
from llmkit.federated.partition import partition
from llmkit.federated.privacy import add_gaussian_noise, clip_update, epsilon_spent, noise_for_epsilon, update_norm
from llmkit.infer.load import load_model

# --------------------------------------------------------------------------------------------- partitions


def _check_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))  # sizes sum to N, disjoint, nothing lost
    assert all(p for p in parts)  # every client gets something


def test_iid_partition_covers_disjoint_balanced_and_seeded():
    parts = partition(103, 10, "iid", seed=3)
    _check_cover(parts, 103)
    assert {len(p) for p in parts} <= {10, 11}
    assert parts == partition(103, 10, "iid", seed=3)
    assert parts != partition(103, 10, "iid", seed=4)
    assert parts[0] != list(range(len(parts[0])))  # shuffled, not contiguous file order


def _skew(alpha: float, seeds=range(4)) -> float:
    """Mean over clients of the total-variation distance between a client's label mix and the global one."""
    labels = [i % 3 for i in range(600)]
    out = []
    for s in seeds:
        for p in partition(600, 8, "dirichlet", labels=labels, alpha=alpha, seed=s):
            share = np.bincount([labels[i] for i in p], minlength=3) / len(p)
            out.append(0.5 * np.abs(share - 1 / 3).sum())
    return float(np.mean(out))


def test_dirichlet_partition_skew_grows_as_alpha_shrinks():
    labels = [i % 2 for i in range(500)]
    parts = partition(500, 10, "dirichlet", labels=labels, alpha=0.3, seed=1)
    _check_cover(parts, 500)
    assert parts == partition(500, 10, "dirichlet", labels=labels, alpha=0.3, seed=1)
    assert parts != partition(500, 10, "dirichlet", labels=labels, alpha=0.3, seed=2)
    skews = [_skew(a) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < 0.1 < skews[1] < skews[2], skews


def test_by_document_partition_keeps_documents_whole_and_balances_size():
    sizes = [50, 40, 30, 20, 10, 10, 5, 5, 5, 5]
    groups = [d for d, n in enumerate(sizes) for _ in range(n)]
    random.Random(0).shuffle(groups)
    parts = partition(len(groups), 3, "by-document", groups=groups, seed=0)
    _check_cover(parts, len(groups))
    owner = {}
    for c, p in enumerate(parts):
        for i in p:
            assert owner.setdefault(groups[i], c) == c  # a document never spans two clients
    loads = sorted(len(p) for p in parts)
    assert loads[-1] - loads[0] <= 10  # greedy largest-first: 60 / 60 / 60 here
    assert partition(len(groups), 3, "by-document", groups=groups, seed=0) == parts


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(n_items=5, n_clients=6, scheme="iid"), DataError, "6 clients but only 5"),
    (dict(n_items=50, n_clients=2, scheme="dirichlet", labels=[0, 1] * 25, alpha=0.0), ConfigError, "alpha: 0.0"),
    (dict(n_items=50, n_clients=2, scheme="dirichlet", labels=[0, 1] * 25, alpha=-1.0), ConfigError, "> 0"),
    (dict(n_items=50, n_clients=2, scheme="shards"), ConfigError, "unknown scheme 'shards'"),
    (dict(n_items=10, n_clients=3, scheme="by-document", groups=[0] * 5 + [1] * 5), DataError,
     "only 2 documents"),
    (dict(n_items=10, n_clients=2, scheme="dirichlet"), ConfigError, "needs --task classify"),
    (dict(n_items=12, n_clients=12, scheme="dirichlet", labels=[0, 1] * 6, alpha=0.05), DataError,
     "left a client without examples"),
])
def test_partition_bad_input_is_one_line_error(kwargs, error, words):
    with pytest.raises(error, match=words) as e:
        partition(**kwargs)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------- privacy


def test_clip_update_bounds_the_norm_and_reports_it_before():
    g = torch.Generator().manual_seed(0)
    update = {"a": torch.randn(30, 4, generator=g) * 5, "b": torch.randn(7, generator=g)}
    before = update_norm(update)
    clipped, norm = clip_update(update, 1.5)
    assert norm == pytest.approx(before) and before > 1.5
    assert update_norm(clipped) <= 1.5 + 1e-6
    assert update_norm(clipped) == pytest.approx(1.5, rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(clipped["a"].flatten(), update["a"].flatten(), dim=0)
    assert cos > 0.9999  # scaled, not re-directed
    small, n = clip_update(clipped, 10.0)  # under the bound: untouched
    assert n == pytest.approx(1.5, rel=1e-5) and torch.equal(small["b"], clipped["b"])
    with pytest.raises(ConfigError, match="clip"):
        clip_update(update, 0.0)


def test_gaussian_noise_has_the_asked_std_and_follows_the_seed():
    zero = {"w": torch.zeros(200, 100)}
    noisy = add_gaussian_noise(zero, 0.3, torch.Generator().manual_seed(1))
    assert noisy["w"].std().item() == pytest.approx(0.3, rel=0.03)
    again = add_gaussian_noise(zero, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(noisy["w"], again["w"]) and torch.equal(zero["w"], torch.zeros(200, 100))


@pytest.mark.slow  # importing opacus takes ~6 s
def test_accountant_is_opacus_rdp_and_grows_with_rounds():
    from opacus.accountants import RDPAccountant

    direct = RDPAccountant()
    for _ in range(20):
        direct.step(noise_multiplier=1.1, sample_rate=0.3)
    assert epsilon_spent(1.1, 0.3, 20, 1e-3) == pytest.approx(direct.get_epsilon(delta=1e-3), rel=1e-9)
    eps = [epsilon_spent(1.1, 0.3, r, 1e-3) for r in (0, 1, 5, 20, 80)]
    assert eps[0] == 0.0 and all(a < b for a, b in zip(eps, eps[1:])), eps
    assert epsilon_spent(0.0, 0.3, 5, 1e-3) == math.inf
    assert epsilon_spent(2.0, 0.3, 20, 1e-3) < epsilon_spent(1.1, 0.3, 20, 1e-3)  # more noise, less spent


@pytest.mark.slow  # importing opacus takes ~6 s
def test_example_level_dp_clips_every_example_and_plans_the_noise():
    """Per-example DP-SGD as a client runs it: with no noise and SGD at lr 1, one step moves the weights by the
    mean of the clipped per-example gradients, so by at most `clip` (plain SGD moves them by far more); the hooks
    come off afterwards; the planned noise spends at most epsilon over the planned steps."""
    from llmkit.federated.privacy import ExamplePrivacy, detach

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    x, y = torch.randn(6, 8) * 10, torch.tensor([0, 1, 0, 1, 1, 0])
    start = [p.detach().clone() for p in model.parameters()]

    def moved() -> float:
        return float(sum((p.detach() - s).pow(2).sum() for p, s in zip(model.parameters(), start)) ** 0.5)

    plain = torch.optim.SGD(model.parameters(), lr=1.0)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    plain.step()
    free = moved()
    with torch.no_grad():
        for p, s in zip(model.parameters(), start):
            p.copy_(s)
    priv = ExamplePrivacy(0.0, 1e-3, 1e-9, 0.05, 6, 60, 10)
    net, wrap = priv.attach(model, seed=0)
    opt = wrap(torch.optim.SGD(net.parameters(), lr=1.0))
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    detach(net)
    assert moved() <= 0.05 + 1e-6 < 0.5 < free, (moved(), free)
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())
    plan = ExamplePrivacy(8.0, 1e-3, 0.0, 1.0, 32, 800, 40)
    plan.steps = 40
    assert plan.rate == 0.04 and 7.9 <= plan.epsilon() <= 8.0


def test_noise_for_epsilon_round_trips():
    z = noise_for_epsilon(8.0, 0.1, 1.0, 10)
    assert 7.98 <= epsilon_spent(z, 1.0, 10, 0.1) <= 8.0
    assert epsilon_spent(z * 0.95, 1.0, 10, 0.1) > 8.0  # the smallest such noise, not any
    assert noise_for_epsilon(2.0, 0.1, 1.0, 10) > z
    for bad, words in ((0.0, "epsilon: 0.0"), (-1.0, "must be > 0")):
        with pytest.raises(ConfigError, match=words):
            noise_for_epsilon(bad, 0.1, 1.0, 10)
    with pytest.raises(ConfigError, match="fraction"):
        epsilon_spent(1.0, 0.0, 10, 0.1)
    with pytest.raises(ConfigError, match="delta"):
        epsilon_spent(1.0, 0.5, 10, 0.0)


# --------------------------------------------------------------------------------------------- data and clients


@pytest.fixture(scope="module")
def cls_setup(tmp_path_factory, corpus_file):
    root = tmp_path_factory.mktemp("fedcls")
    return tiny_bert_run(root / "bert", corpus_file), write_csv(root / "reviews.csv", synthetic(240))


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory, corpus_file, tokenizer_dir):
    root = tmp_path_factory.mktemp("fedlm")
    docs = root / "plays"
    docs.mkdir()
    text = corpus_file.read_text()
    for d, size in enumerate((12_000, 9_000, 7_000, 5_000, 4_000, 3_000)):  # six "plays" of different sizes
        (docs / f"play{d}.txt").write_text(text[d * 12_000: d * 12_000 + size])
    return save_run(root / "gpt", tiny_model_config(), Tokenizer.load(tokenizer_dir), "causal_lm"), docs


def _cfg(base, data, **kw):
    over = {"finetune.base": str(base), "data.path": str(data), "train.device": "cpu", "train.dtype": "float32",
            "train.seed": 0, "data.batch_size": 8, "finetune.max_length": 32}
    over.update({k if "." in k else f"federated.{k}": v for k, v in kw.items()})
    return federated_config(None, over)


def test_classify_data_deals_the_train_split_and_keeps_val_and_test_on_the_server(cls_setup):
    base, csv = cls_setup
    cfg = _cfg(base, csv, clients=4, split="dirichlet", alpha=0.5)
    tok = load_model(base).tokenizer
    data = load_federated_data(cfg, tok, 32)
    assert data.labels == ["neg", "pos"] == cfg.finetune.labels
    assert data.n_train == 192 == sum(s.n_examples for s in data.clients)  # the fixed 80 % split
    assert sum(len(b["labels"]) for b in data.val) == 24 and sum(len(b["labels"]) for b in data.test) == 24
    mixes = [Counter(s.labels) for s in data.clients]
    assert len({round(m[0] / sum(m.values()), 2) for m in mixes}) > 1  # non-IID: label shares differ
    b = next(data.clients[0].batches(8, seed=0))
    assert set(b) == {"input_ids", "attention_mask", "labels"} and b["input_ids"].shape[1] <= 32
    epochs = _cfg(base, csv, clients=4, local_steps=0, local_epochs=0.5)
    assert local_steps(epochs, data.clients[0]) == math.ceil(0.5 * data.clients[0].n_examples / 8)
    assert local_steps(_cfg(base, csv, clients=4, local_steps=7), data.clients[0]) == 7
    with pytest.raises(DataError, match="300 clients but only 192"):
        load_federated_data(_cfg(base, csv, clients=300), tok, 32)


def test_lm_data_by_document_gives_whole_plays_and_holds_out_windows(lm_setup):
    base, docs = lm_setup
    cfg = _cfg(base, docs, task="lm", clients=3, split="by-document", **{"finetune.max_val_examples": 12})
    tok = load_model(base).tokenizer
    data = load_federated_data(cfg, tok, 32)
    assert data.task == "lm" and data.test is None and len(data.clients) == 3
    assert sum(len(b["input_ids"]) for b in data.val) == 12
    per_client = [set(map(bytes, np.asarray(s.rows).astype(np.int32))) for s in data.clients]
    assert not per_client[0] & per_client[1] and not per_client[1] & per_client[2]
    val = {bytes(np.concatenate([b["input_ids"][i].numpy(), b["labels"][i, -1:].numpy()]).astype(np.int32))
           for b in data.val for i in range(len(b["input_ids"]))}
    assert not val & set().union(*per_client)  # held-out windows are in no client's shard
    b = next(data.clients[1].batches(4, seed=0))
    assert b["input_ids"].shape == (4, 32) and torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    with pytest.raises(DataError, match="only 6 documents"):
        load_federated_data(_cfg(base, docs, task="lm", clients=7, split="by-document"), tok, 32)


@pytest.mark.slow
def test_trainable_state_with_lora_is_adapters_and_head_and_round_trips(cls_setup):
    base, csv = cls_setup
    cfg = _cfg(base, csv, clients=2, **{"finetune.lora": True, "finetune.lora_r": 2})
    model = build_model(cfg, load_model(base), ["neg", "pos"])
    state = trainable_state(model)
    assert state and all("lora_" in n or "classifier" in n for n in state)
    total = sum(p.numel() for p in model.parameters())
    assert sum(t.numel() for t in state.values()) < total / 5
    other = build_model(cfg, load_model(base), ["neg", "pos"])
    shifted = {k: v + 1.0 for k, v in state.items()}
    load_trainable(other, shifted)
    assert all(torch.equal(trainable_state(other)[k], shifted[k]) for k in state)
    with pytest.raises(CheckpointError, match="missing"):
        load_trainable(other, dict(list(state.items())[1:]))


@pytest.mark.slow
def test_local_update_lowers_the_loss_on_the_clients_shard(cls_setup, tmp_path):
    base, csv = cls_setup
    cfg = _cfg(base, csv, clients=2, local_steps=30, **{"train.lr": 3e-3})
    loaded = load_model(base)
    data = load_federated_data(cfg, loaded.tokenizer, 32)
    model = build_model(cfg, loaded, data.labels)
    start = trainable_state(model)
    before = evaluate_global(model, data)
    new, metrics = local_update(model, data.clients[0], cfg, start, 1, tmp_path / "work")
    load_trainable(model, new)
    after = evaluate_global(model, data)
    assert after["loss"] < before["loss"] - 0.05, (before, after)
    assert after["accuracy"] > max(0.7, before["accuracy"]) and 0.5 < after["macro_f1"] <= 1
    assert metrics["examples"] == data.clients[0].n_examples and metrics["steps"] == 30
    assert list((tmp_path / "work").iterdir()) == []  # the loop's folder is gone: nothing piles up over rounds


@pytest.mark.slow
def test_fedprox_term_pulls_local_weights_toward_the_global_ones(lm_setup, tmp_path):
    base, docs = lm_setup
    dist = {}
    for strategy, mu in (("fedavg", 0.0), ("fedprox", 5.0)):
        cfg = _cfg(base, docs, task="lm", clients=2, split="by-document", local_steps=8, strategy=strategy, mu=mu,
                   **{"train.lr": 1e-2})
        loaded = load_model(base)
        data = load_federated_data(cfg, loaded.tokenizer, 32)
        model = build_model(cfg, loaded, None)
        start = trainable_state(model)
        new, metrics = local_update(model, data.clients[0], cfg, start, 1, tmp_path)
        dist[strategy] = update_norm({k: new[k] - start[k] for k in start})
        assert math.isfinite(metrics["train_loss"])
    assert dist["fedprox"] < 0.8 * dist["fedavg"], dist
