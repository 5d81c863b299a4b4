"""BERT encoder: parity with transformers (random tiny and the real all-MiniLM-L6-v2), MLM/NSP objectives,
masked-LM pretraining through the one loop."""

import json

import pytest
import torch
import transformers

from llmkit.config import ModelConfig, RunConfig, build
from llmkit.data.wordpiece import encode_texts, special_ids, train_wordpiece
from llmkit.errors import ConfigError
from llmkit.interop.hf import from_hf_state_dict, hf_config, to_hf_state_dict
from llmkit.interop.registry import builtin_source
from llmkit.model import EncoderLM, build_model
from llmkit.train.objectives import get_objective


def tiny_bert(**kw) -> ModelConfig:
    base = dict(arch="bert", vocab_size=120, block_size=32, n_layer=2, n_head=4, n_embd=32, norm_eps=1e-12)
    return ModelConfig(**{**base, **kw})


def test_bert_matches_transformers_with_heads_and_padding():
    cfg = tiny_bert()
    kw = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type")}
    hf = transformers.BertForPreTraining(transformers.BertConfig(**kw, attn_implementation="eager")).eval()
    ours = build_model(cfg).eval()
    assert isinstance(ours, EncoderLM)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg, ours.state_dict()), strict=False)
    x, types = torch.randint(0, 120, (3, 20)), torch.randint(0, 2, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 13:] = 0  # right padding
    with torch.no_grad():
        theirs = hf(input_ids=x, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
        out = ours(x, attention_mask_2d=mask, token_type_ids=types, all_logits=True)
        eager = ours(x, attention_mask_2d=mask, token_type_ids=types, need_weights=True)
    real = mask.bool()
    assert (theirs.hidden_states[-1] - out.hidden)[real].abs().max() < 1e-5
    assert (theirs.prediction_logits - out.logits[..., :120])[real].abs().max() < 1e-4
    assert (theirs.seq_relationship_logits - out.nsp_logits).abs().max() < 1e-5
    assert (eager.hidden - out.hidden)[real].abs().max() < 1e-5  # the eager (weights) path is the same math
    assert eager.attentions[0].shape == (3, 4, 20, 20)
    assert eager.attentions[0][1, :, :13, 13:].abs().max() == 0  # no real token attends to padding
    # and back: every HF tensor but the tied decoder comes out with the same values
    back = to_hf_state_dict(ours.state_dict(), cfg)
    sd = hf.state_dict()
    assert set(sd) - set(back) == {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    assert all(torch.equal(back[k], sd[k]) for k in back)


def test_minilm_hidden_states_equal_transformers():
    from llmkit.infer.load import load_model

    src = builtin_source("all-minilm-l6-v2")
    bb = load_model("all-minilm-l6-v2")
    texts = ["The cat sits outside.", "A man is playing a guitar and singing!", "naïve café résumé",
             "It is raining heavily in Paris tonight, and the streets are empty."]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(src))
    enc = hf_tok(texts, padding=True, return_tensors="pt")
    ids = encode_texts(bb.tokenizer, texts, 256)
    assert [r for r in ids] == [[t for t, m in zip(row, mk) if m] for row, mk in
                                zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist())]
    hf = transformers.BertModel.from_pretrained(str(src)).eval()
    with torch.no_grad():
        theirs = hf(**enc)
        ours = bb.model(enc["input_ids"], attention_mask_2d=enc["attention_mask"])
    real = enc["attention_mask"].bool()
    assert (theirs.last_hidden_state - ours.hidden)[real].abs().max() <= 1e-4
    assert (theirs.pooler_output - ours.pooled).abs().max() <= 1e-4


def test_minilm_tokenizer_is_wordpiece_with_cls_sep():
    from llmkit.infer.load import load_model

    tok = load_model("all-minilm-l6-v2").tokenizer
    assert tok.kind == "wordpiece"
    ids = special_ids(tok)
    assert (ids["cls"], ids["sep"], ids["pad"], ids["mask"]) == (101, 102, 0, 103)
    row = encode_texts(tok, ["Hello world " * 200], 16)[0]
    assert len(row) == 16 and row[0] == 101 and row[-1] == 102  # truncated, framed, never padded to 128


@pytest.fixture(scope="module")
def wp_tokenizer(corpus_file):
    return train_wordpiece([corpus_file.read_text()], vocab_size=300)


def test_trained_wordpiece_ids_are_the_same_in_every_process(tmp_path, corpus_file):
    """The trainer numbers pieces in hash-map order, which differs per process: llmkit renumbers them."""
    import subprocess
    import sys

    script = ("import json, sys; from llmkit.data.wordpiece import train_wordpiece; "
              "tok = train_wordpiece([open(sys.argv[1]).read()[:50000]], vocab_size=300); "
              "print(json.dumps(sorted(tok.tk.get_vocab().items())))")
    vocabs = [subprocess.run([sys.executable, "-c", script, str(corpus_file)], capture_output=True, text=True,
                             check=True).stdout for _ in range(3)]
    assert vocabs[0] == vocabs[1] == vocabs[2]
    ids = dict(json.loads(vocabs[0]))
    assert [ids[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    tok = train_wordpiece([corpus_file.read_text()[:50000]], vocab_size=300)
    assert tok.decode(tok.encode("the king is dead")) == "the king is dead"


def test_masked_lm_masking(wp_tokenizer):
    mlm = get_objective("mlm", tokenizer=wp_tokenizer)
    ids = special_ids(wp_tokenizer)
    x = torch.randint(len(ids), wp_tokenizer.vocab_size, (64, 64))
    framed, types, nsp = mlm.frame(x)
    assert nsp is None and (framed[:, 0] == ids["cls"]).all() and (framed[:, -1] == ids["sep"]).all()
    corrupted, chosen = mlm.mask(framed)
    rate = chosen[:, 1:-1].float().mean().item()
    assert 0.13 < rate < 0.17 and not chosen[:, 0].any() and not chosen[:, -1].any()
    to_mask = (corrupted[chosen] == ids["mask"]).float().mean().item()
    kept = (corrupted[chosen] == framed[chosen]).float().mean().item()
    assert 0.75 < to_mask < 0.85 and 0.07 < kept < 0.14  # 80 % [MASK], 10 % kept (+ random hits)
    assert torch.equal(corrupted[~chosen], framed[~chosen])


def test_nsp_pairs(wp_tokenizer):
    nsp = get_objective("mlm+nsp", tokenizer=wp_tokenizer)
    ids = special_ids(wp_tokenizer)
    x = torch.arange(64 * 40).reshape(64, 40) % 250 + 10
    framed, types, labels = nsp.frame(x)
    assert framed.shape == (64, 40) and 0.3 < labels.float().mean() < 0.7
    seps = (framed == ids["sep"]).nonzero()
    assert len(seps) == 2 * 64
    sep = seps[0, 1].item()  # [CLS] A [SEP] | B [SEP]
    assert (types[:, : sep + 1] == 0).all() and (types[:, sep + 1:] == 1).all()
    follows = framed[:, sep + 1] == x[:, sep - 1]  # B continues A exactly when the label says "not random"
    assert torch.equal(follows, labels == 0)


def test_objective_needs_matching_arch(tmp_path):
    from llmkit.train.pretrain import pretrain

    for model, objective in (({"arch": "gpt2"}, "mlm"), ("bert-mini", "causal_lm"), ("bert-mini", "classify")):
        cfg = build(RunConfig, {"model": model, "train": {"objective": objective}})
        with pytest.raises(ConfigError, match="does not pretrain"):
            pretrain(cfg, tmp_path / "run", quiet=True)
    with pytest.raises(ConfigError, match="needs the tokenizer"):
        get_objective("mlm")


@pytest.mark.slow
def test_pretrain_mlm_nsp_logs_masked_accuracy(tmp_path, corpus_file):
    from llmkit.data.shards import prepare
    from llmkit.train.pretrain import pretrain

    tok_dir = train_wordpiece([corpus_file.read_text()], vocab_size=400).save(tmp_path / "tok")
    prepare(str(corpus_file), tok_dir, tmp_path / "data", quiet=True)
    cfg = build(RunConfig, {
        "model": dict(arch="bert", block_size=32, n_layer=2, n_head=2, n_embd=32, norm_eps=1e-12),
        "data": {"path": str(tmp_path / "data"), "batch_size": 16},
        "train": dict(objective="mlm+nsp", max_steps=40, lr=3e-3, warmup_steps=5, eval_interval=20, eval_iters=2,
                      log_interval=10, dtype="float32", device="cpu")})
    res = pretrain(cfg, tmp_path / "run", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert "masked_accuracy" in train_rows[-1] and "val_masked_accuracy" in res.last
    assert train_rows[-1]["mlm_loss"] < train_rows[0]["mlm_loss"] - 0.3
    assert "val_perplexity" not in res.last  # LM figures are for next-token loss only
    assert "nsp_accuracy" in train_rows[-1] and "val_nsp_accuracy" in res.last
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(evals) == 2
