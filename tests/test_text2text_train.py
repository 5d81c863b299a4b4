"""Training on pairs: the seq2seq objective (teacher forcing, padding masks), length-grouped resumable batches,
`finetune --task text2text` (loss goes down, resume == no resume) and `--task sft` (the prompt is masked out of
the loss; LoRA gives a plain, loadable decoder run folder)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from helpers_classify import run_cli, save_run
from llmkit.config import ModelConfig
from llmkit.data.pair_batches import IGNORE_INDEX, PairBatches, collate_pairs
from llmkit.data.pairs import sft_prompt
from llmkit.data.tokenizer import Tokenizer
from llmkit.infer.load import load_model
from llmkit.model import build_model
from llmkit.model.weights import load_weights
from llmkit.tasks.pair_tasks import pair_task_config
from llmkit.tasks.sft import sft_example
from llmkit.tasks.text2text import text2text
from llmkit.train.objectives import Seq2Seq

OLD = {"thou": "you", "art": "are", "hath": "has", "thee": "you", "saith": "says", "ye": "you", "unto": "to",
       "doth": "does", "shalt": "shall", "thy": "your"}
PLAIN = "the lord king land house people city word day son man water fire stone".split()


def archaic_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Early Modern English -> modern: a word-for-word rewrite a tiny model learns in a few dozen steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(list(OLD) + PLAIN) for _ in range(rng.randint(3, 9))]
        out.append({"source": " ".join(words), "target": " ".join(OLD.get(w, w) for w in words)})
    return out


@pytest.fixture
def pair_file(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in archaic_pairs(200)), encoding="utf-8")
    return f


def tiny_text2text(pair_file, **extra):
    overrides = {"finetune.task": "text2text", "finetune.base": "seq2seq-tiny", "data.path": str(pair_file),
                 "finetune.tokenizer_vocab_size": 320, "data.batch_size": 8, "train.max_steps": 24,
                 "train.eval_interval": 12, "train.eval_iters": 2, "train.warmup_steps": 4, "train.log_interval": 1,
                 "train.threads": 1, "train.device": "cpu", "train.dtype": "float32", **extra}
    return pair_task_config(None, overrides)


# --------------------------------------------------------------------------------------------- batches


def test_pair_batches_pad_group_by_length_and_resume_exactly():
    rng = random.Random(0)
    inputs = [[5] * rng.randint(1, 40) for _ in range(100)]
    labels = [[7] * (len(x) + rng.randint(0, 4)) for x in inputs]  # a rewrite is about as long as its source
    a = PairBatches(inputs, labels, batch_size=8, pad_id=0, kind="seq2seq", seed=3)
    first = [next(a) for _ in range(13)]  # 12 full batches and the partial one of epoch 0
    assert [b["input_ids"].shape[0] for b in first] == [8] * 12 + [4]
    b = first[0]
    assert torch.equal(b["attention_mask"].sum(1), (b["input_ids"] == 5).sum(1))
    assert ((b["labels"] == IGNORE_INDEX) | (b["labels"] == 7)).all()
    # Length grouping: far less padding than batches in random order have.
    padded = sum(x["input_ids"].numel() + x["labels"].numel() for x in first)
    shuffled = rng.sample(range(100), 100)
    chunks = [shuffled[i:i + 8] for i in range(0, 100, 8)]
    random_order = sum(len(c) * (max(len(inputs[i]) for i in c) + max(len(labels[i]) for i in c)) for c in chunks)
    real = sum(len(i) + len(t) for i, t in zip(inputs, labels))
    assert padded - real < 0.5 * (random_order - real)
    state = a.state_dict()
    want = [next(a) for _ in range(3)]
    c = PairBatches(inputs, labels, batch_size=8, pad_id=0, kind="seq2seq", seed=3)
    c.load_state_dict(state)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(want, [next(c) for _ in range(3)]) for k in x)


def test_seq2seq_objective_teacher_forces_and_masks_padding(tokenizer_dir):
    """A padded batch's loss is the token-weighted mean of each pair's loss alone: padding changes nothing."""
    torch.manual_seed(0)
    tok = Tokenizer.load(tokenizer_dir)
    model = build_model(ModelConfig(arch="mbart", n_layer=1, n_encoder_layer=1, n_head=2, n_embd=32,
                                    block_size=32, vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():  # large weights: peaked attention, so attending to a pad would show
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    objective = Seq2Seq(tok, label_smoothing=0.1)
    pairs = [([11, 12, 13, tok.eos_id], [21, 22, tok.eos_id]), ([14, tok.eos_id], [23, 24, 25, 26, tok.eos_id])]
    batch = collate_pairs([p[0] for p in pairs], [p[1] for p in pairs], tok.pad_id, "seq2seq")
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"][0].tolist() == [21, 22, tok.eos_id, IGNORE_INDEX, IGNORE_INDEX]
    together, _ = objective(model, batch)
    alone = [objective(model, collate_pairs([s], [t], tok.pad_id, "seq2seq"))[0] for s, t in pairs]
    weighted = (alone[0] * 3 + alone[1] * 5) / 8
    assert torch.allclose(together, weighted, rtol=0, atol=1e-4)
    # Teacher forcing: the decoder reads [start, labels[:-1]]; eval mode reports plain cross-entropy, training
    # mode smooths the labels.
    dec_in = torch.tensor([[tok.eos_id, 21, 22, tok.eos_id, tok.pad_id], [tok.eos_id, 23, 24, 25, 26]])
    logits = model(batch["input_ids"], batch["attention_mask"], dec_in).logits.float().flatten(0, 1)  # (B*T, V)
    labels = batch["labels"].flatten()
    assert torch.allclose(together, F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX), atol=1e-5)
    model.train()
    smoothed = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=0.1)
    assert torch.allclose(objective(model, batch)[0], smoothed, atol=1e-5)


# --------------------------------------------------------------------------------------------- text2text


@pytest.mark.slow
def test_text2text_tiny_learns_and_resume_equals_no_resume(tmp_path, pair_file):
    straight = text2text(tiny_text2text(pair_file), tmp_path / "straight", quiet=True)
    lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in lines if "val_loss" in r]
    train_losses = {r["step"]: r["loss"] for r in lines if "loss" in r}
    assert val[-1] < val[0] < train_losses[1]  # the loss goes down
    assert straight["steps"] == 24 and (tmp_path / "straight" / "tokenizer" / "tokenizer.json").is_file()

    class Stop(Exception):
        pass

    def stop_at_13(step, _):
        if step == 13:
            raise Stop

    with pytest.raises(Stop):  # killed after the step-12 checkpoint
        text2text(tiny_text2text(pair_file), tmp_path / "resumed", quiet=True, callbacks=(stop_at_13,))
    text2text(tiny_text2text(pair_file), tmp_path / "resumed", resume=True, quiet=True)
    resumed = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["loss"] for r in resumed if "loss" in r} == train_losses
    a, b = (load_weights(tmp_path / d / "model.safetensors") for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    loaded = load_model(tmp_path / "straight")  # a run folder every verb loads
    assert loaded.cfg.arch == "mbart" and loaded.run.train.objective == "seq2seq"


def test_text2text_refuses_a_decoder_and_writes_nothing(tmp_path, pair_file, tokenizer_dir, capsys):
    base = save_run(tmp_path / "dec", tiny_model_config("llama"), Tokenizer.load(tokenizer_dir), "causal_lm")
    rc, _, err = run_cli(capsys, "finetune", "--task", "text2text", "--model", base, "--data", pair_file,
                         "--out", tmp_path / "out")
    assert rc == 2 and "error: --model" in err and "encoder–decoder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{"source": "thou"}\n', encoding="utf-8")
    rc, _, err = run_cli(capsys, "finetune", "--task", "sft", "--model", base, "--data", bad, "--out", tmp_path / "o2")
    assert rc == 2 and "bad.jsonl:2: no 'target' field" in err and not (tmp_path / "o2").exists()


# --------------------------------------------------------------------------------------------- sft


def test_sft_labels_mask_the_prompt_exactly(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    ids, labels = sft_example(tok, "Thou art here.", "You are here.", "Rewrite:")
    prompt = tok.encode_prompt(sft_prompt(tok, "Thou art here.", "Rewrite:"))
    answer = [*tok.encode("You are here."), tok.eos_id]
    assert ids == prompt + answer[:-1] and len(labels) == len(ids)
    assert labels[:len(prompt) - 1] == [IGNORE_INDEX] * (len(prompt) - 1)  # no loss on the prompt ...
    assert labels[len(prompt) - 1:] == answer  # ... and on every answer token, the end token included
    batch = collate_pairs([ids, ids[:5]], [labels, labels[:5]], tok.pad_id, "causal")
    assert set(batch) == {"input_ids", "labels"}
    assert (batch["labels"] != IGNORE_INDEX).sum() == len(answer)


@pytest.mark.slow
def test_sft_lora_on_a_tiny_decoder_writes_a_loadable_run(tmp_path, pair_file, tokenizer_dir, capsys):
    tok = Tokenizer.load(tokenizer_dir)
    base = save_run(tmp_path / "dec", tiny_model_config("llama", block_size=128), tok, "causal_lm")
    rc, out, err = run_cli(capsys, "finetune", "--task", "sft", "--model", base, "--data", pair_file, "--lora",
                           "--out", tmp_path / "sft", "--max-steps", 6, "--train.eval_interval", 3,
                           "--train.threads", 1, "--train.device", "cpu", "--quiet", "--json")
    assert rc == 0, err
    report = json.loads(out.strip().splitlines()[-1])  # the loop writes its evaluations to stdout even --quiet
    assert report["task"] == "sft" and report["lora"] and report["steps"] == 6 and report["train_pairs"] == 160
    assert (tmp_path / "sft" / "adapter" / "adapter_config.json").is_file()
    loaded = load_model(tmp_path / "sft")
    assert loaded.run.finetune.task == "sft" and loaded.run.finetune.instruction
    tuned, orig = loaded.model.state_dict(), load_model(base).model.state_dict()
    assert set(tuned) == set(orig)  # merged: no LoRA names left, the base's own layout
    assert any(not torch.equal(tuned[k], orig[k]) for k in tuned)
