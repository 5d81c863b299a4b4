"""The encoder–decoder (arch mbart): parity with transformers' MBartForConditionalGeneration, the exported folder,
and decoding (greedy = transformers' greedy, beam search, KV cache = no cache, the errors)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model_config
from llmkit.config import MODEL_PRESETS, ModelConfig
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import ConfigError, DataError
from llmkit.infer.load import load_model
from llmkit.infer.seq2seq import _beam_search, _encode, seq2seq_decode, seq2seq_generate
from llmkit.interop.convert import convert
from llmkit.interop.hf_folder import read_hf_folder
from llmkit.interop.run_folder import Converted, write_run_folder
from llmkit.model import build_model
from llmkit.model.seq2seq import Seq2SeqLM, decoder_start_id, shift_right, source_ids
from llmkit.model.weights import weights_for_save

SOURCES = ["ROMEO: But soft, what light", "Thou art more lovely", "O", "KING: Now is the winter of our discontent made"]


def seq2seq_config(vocab_size: int, **kw) -> ModelConfig:
    return tiny_model_config("mbart", vocab_size=vocab_size, n_encoder_layer=3, block_size=48, **kw)


def spread_weights(model: Seq2SeqLM) -> Seq2SeqLM:
    """Random weights large enough that every tensor moves the logits (the 0.02 init leaves them near uniform, and
    LayerNorm output sums to zero, so some mistakes would cancel)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn_like(p) * 0.2 if p.ndim == 2 else base + 0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def model(tok) -> Seq2SeqLM:
    torch.manual_seed(0)
    return spread_weights(build_model(seq2seq_config(tok.vocab_size)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model, tok):
    """A run folder of the model, converted by `llmkit convert --to hf`'s function."""
    root = tmp_path_factory.mktemp("s2s")
    write_run_folder(Converted(model.cfg, weights_for_save(model), tok), root / "run")
    return root / "run", convert(root / "run", root / "hf", to="hf")


def batch(tok: Tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [source_ids(tok, t) for t in texts]
    ids = torch.full((len(rows), max(map(len, rows))), tok.pad_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def test_presets_build_and_config_checks():
    with torch.device("meta"):  # shapes only: no 21 M random draws
        small = build_model(ModelConfig(**MODEL_PRESETS["seq2seq-small"]))
    assert 20e6 < small.num_params(non_embedding=False) < 30e6
    assert len(small.enc_blocks) == 6 and len(small.dec_blocks) == 3
    with pytest.raises(ConfigError, match="n_encoder_layer"):
        ModelConfig(arch="gpt2", n_encoder_layer=2)
    assert ModelConfig(arch="mbart", n_layer=4).n_encoder_layer == 4


def test_shift_right():
    labels = torch.tensor([[5, 6, 2, -100], [7, 2, -100, -100]])
    assert shift_right(labels, 2, 1).tolist() == [[2, 5, 6, 2], [2, 7, 2, 1]]


def test_logits_and_loss_match_transformers(exported, model, tok):
    """Export -> AutoModelForSeq2SeqLM (no missing or unexpected weights) -> the same logits and loss."""
    from transformers import AutoModelForSeq2SeqLM

    hf, info = AutoModelForSeq2SeqLM.from_pretrained(exported[1], output_loading_info=True)
    assert type(hf).__name__ == "MBartForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask = batch(tok, SOURCES)  # right padding in three of four rows
    labels, _ = batch(tok, list(reversed(SOURCES)))
    labels = labels.masked_fill(labels == tok.pad_id, -100)
    dec = shift_right(labels, decoder_start_id(tok), tok.pad_id)
    with torch.no_grad():
        ours = model(ids, mask, dec).logits
        theirs = hf.eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        our_loss = model(ids, mask, dec, labels=labels).loss
        their_loss = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels).loss
    assert ours.shape == theirs.shape and ours.abs().mean() > 0.3  # logits far from uniform: a real comparison
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert abs(our_loss.item() - their_loss.item()) <= 1e-4


def test_exported_tokenizer_and_generation_settings(exported, tok):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(exported[1])
    text = SOURCES[0]
    assert hf_tok(text).input_ids == source_ids(tok, text)  # eos appended, as the model was trained
    assert hf_tok.decode(hf_tok(text).input_ids, skip_special_tokens=True) == text
    config = json.loads((exported[1] / "config.json").read_text())
    generation = json.loads((exported[1] / "generation_config.json").read_text())
    assert config["decoder_start_token_id"] == generation["decoder_start_token_id"] == tok.eos_id
    assert generation["forced_eos_token_id"] is None and generation["max_length"] == 48  # no 20-token default


def test_transformers_greedy_generate_gives_the_same_text(exported, model, tok):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    hf = AutoModelForSeq2SeqLM.from_pretrained(exported[1]).eval()
    hf_tok = AutoTokenizer.from_pretrained(exported[1])
    enc = hf_tok(SOURCES, return_tensors="pt", padding=True)
    out = hf.generate(**enc, max_new_tokens=12, do_sample=False, num_beams=1)
    theirs = hf_tok.batch_decode(out, skip_special_tokens=True)
    ours = seq2seq_decode(model, tok, SOURCES, max_new_tokens=12, batch_size=3)
    assert [g.text for g in ours] == theirs
    assert any(g.token_ids for g in ours) and any(t.strip() for t in theirs)


def test_import_back_and_load(exported, model):
    conv = read_hf_folder(exported[1])
    assert conv.cfg.arch == "mbart" and conv.cfg.n_encoder_layer == 3 and conv.cfg.n_layer == 2
    mine = weights_for_save(model)
    for name, t in conv.weights.items():
        assert torch.equal(t, mine[name][: t.shape[0]]), name
    for src in exported:  # the run folder and the HF folder load for inference alike
        loaded = load_model(src)
        assert isinstance(loaded.model, Seq2SeqLM)
        assert seq2seq_generate(loaded.model, loaded.tokenizer, SOURCES[:2], max_new_tokens=6) == \
            seq2seq_generate(model, loaded.tokenizer, SOURCES[:2], max_new_tokens=6)


def test_kv_cache_decoding_equals_recomputing_everything(model, tok):
    got = seq2seq_decode(model, tok, SOURCES, max_new_tokens=10, batch_size=4)
    memory = _encode(model, [source_ids(tok, s) for s in SOURCES], tok.pad_id, torch.device("cpu"))
    seq = torch.full((len(SOURCES), 1), decoder_start_id(tok))
    with torch.no_grad():
        for _ in range(10):  # no cache: the whole prefix through the decoder at every step
            nxt = model.logits(model.decode(seq, memory)[:, -1]).argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    for g, row in zip(got, seq[:, 1:].tolist()):
        expect = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
        assert g.token_ids == expect
        assert g.finish_reason == ("eos" if tok.eos_id in row else "length")


def test_beam_search(model, tok):
    greedy = seq2seq_decode(model, tok, SOURCES, max_new_tokens=10)
    memory = _encode(model, [source_ids(tok, s) for s in SOURCES], tok.pad_id, torch.device("cpu"))
    with torch.no_grad():  # the beam search code itself with one beam is greedy
        one = _beam_search(model, memory, decoder_start_id(tok), tok.eos_id, 10, 1, 0.0, True)
    assert [ids for ids, *_ in one] == [g.token_ids for g in greedy]
    wide = seq2seq_decode(model, tok, SOURCES, max_new_tokens=10, beam=4, length_penalty=0.0)
    assert all(w.logprob >= g.logprob - 1e-5 for w, g in zip(wide, greedy))
    assert all(abs(w.score - w.logprob) < 1e-6 for w in wide)  # length_penalty 0: the raw log-probability
    batched = seq2seq_decode(model, tok, SOURCES, max_new_tokens=10, beam=4, length_penalty=0.0, batch_size=1)
    assert [w.token_ids for w in wide] == [w.token_ids for w in batched]


def test_sampling_is_seeded(model, tok):
    a = seq2seq_generate(model, tok, SOURCES, max_new_tokens=8, temperature=1.0, top_k=20, seed=3)
    b = seq2seq_generate(model, tok, SOURCES, max_new_tokens=8, temperature=1.0, top_k=20, seed=3)
    c = seq2seq_generate(model, tok, SOURCES, max_new_tokens=8, temperature=1.0, top_k=20, seed=4)
    assert a == b and a != c


def test_bad_input_is_one_line_errors(model, tok):
    with pytest.raises(ConfigError, match="--beam must be at least 1, got 0"):
        seq2seq_generate(model, tok, SOURCES, max_new_tokens=4, beam=0)
    long = "the " * 200
    with pytest.raises(DataError, match=r"source 1: \d+ tokens \(with eos\) is longer than the encoder's context "
                                        r"of 48 tokens"):
        seq2seq_generate(model, tok, ["fine", long], max_new_tokens=4)
    with pytest.raises(ConfigError, match="max-new-tokens 49 is more than the decoder's 48 positions"):
        seq2seq_generate(model, tok, SOURCES, max_new_tokens=49)
    with pytest.raises(ConfigError, match="deterministic"):
        seq2seq_generate(model, tok, SOURCES, max_new_tokens=4, beam=2, temperature=0.7)
