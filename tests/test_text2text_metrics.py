"""Text-to-text metrics (sacreBLEU, rouge-score called as their authors intend) and `llmkit eval --task text2text`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF

from llmkit.cli.main import main
from llmkit.config import FinetuneConfig, FinetuneRunConfig, ModelConfig, save_yaml
from llmkit.data.pairs import sft_prompt
from llmkit.data.tokenizer import Tokenizer, end_of_turn_ids
from llmkit.errors import DataError
from llmkit.infer.generate import SamplingConfig, generate
from llmkit.infer.load import load_model
from llmkit.interop.run_folder import Converted, write_run_folder
from llmkit.model import build_model
from llmkit.text2text.metrics import split_sentences, text2text_scores

# References of several sentences: the summary-level LCS (Lsum) then differs from the plain LCS (L).
SENTENCES = [
    ["The king is dead.", "Long live the king!"],
    ["He went home.", "She stayed at the inn.", "Nobody slept that night."],
    ["Blessed are the meek, for they shall inherit the earth."],
    ["Thou shalt not kill.", "Thou shalt not steal."],
]
REFERENCES = [" ".join(s) for s in SENTENCES]
PREDICTIONS = ["Long live the king! The king is dead.",
               "She stayed at the inn. He went home. Nobody slept.",
               "Blessed are the meek: they will inherit the earth.",
               "Thou shalt not steal. Thou shalt not kill."]


def test_figures_equal_the_libraries_called_directly():
    got = text2text_scores(PREDICTIONS, REFERENCES)
    bleu, chrf = BLEU(), CHRF(word_order=2)
    assert got["bleu"] == pytest.approx(bleu.corpus_score(PREDICTIONS, [REFERENCES]).score, abs=1e-9)
    assert got["chrf"] == pytest.approx(chrf.corpus_score(PREDICTIONS, [REFERENCES]).score, abs=1e-9)
    assert got["bleu_signature"] == str(bleu.get_signature()) and "tok:13a" in got["bleu_signature"]
    assert "nw:2" in got["chrf_signature"]  # chrF++: word bigrams on
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    # Lsum by the book: one sentence per line (here split by hand, independently of the code under test).
    lines = [("\n".join(s), "\n".join(split_by_hand(p))) for s, p in zip(SENTENCES, PREDICTIONS)]
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        want = 100 * sum(scorer.score(r, p)[key].fmeasure for r, p in lines) / len(lines)
        assert got[key] == pytest.approx(want, abs=1e-9), key
    assert got["exact_match"] == 0.0 and got["examples"] == 4
    assert text2text_scores(["same text "], [" same text"])["exact_match"] == 1.0


def split_by_hand(text: str) -> list[str]:
    out, cur = [], ""
    for word in text.split():
        cur = f"{cur} {word}".strip()
        if word[-1] in ".!?":
            out.append(cur)
            cur = ""
    return out + ([cur] if cur else [])


def test_lsum_is_computed_on_split_sentences():
    """Fails if Lsum is scored without sentence splitting: rouge-score then silently gives Lsum == L."""
    got = text2text_scores(PREDICTIONS, REFERENCES)
    assert got["rougeLsum"] != pytest.approx(got["rougeL"], abs=0.5)
    assert got["rougeLsum"] > got["rougeL"]  # reordered sentences: the summary-level LCS credits each one
    assert split_sentences("He went home. She stayed.\nNobody slept!") == "He went home.\nShe stayed.\nNobody slept!"


def test_bad_input_is_one_line():
    with pytest.raises(DataError, match="no predictions to score"):
        text2text_scores([], [])
    with pytest.raises(DataError, match="2 predictions but 1 references"):
        text2text_scores(["a", "b"], ["a"])


# ------------------------------------------------------------------------------------ eval --task text2text

PAIRS = [{"source": f"Thou art {w}, and thy word is {w}.", "target": f"You are {w}, and your word is {w}."}
         for w in ("good", "true", "kind", "wise", "fair", "just")]


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in PAIRS), encoding="utf-8")
    return p


def run_folder(path: Path, cfg: ModelConfig, tokenizer_dir: Path) -> Path:
    """A run folder holding a randomly initialised model: decoding needs no training to be tested."""
    torch.manual_seed(0)
    tok = Tokenizer.load(tokenizer_dir)
    cfg.vocab_size = tok.vocab_size
    weights = {k: v.detach().clone() for k, v in build_model(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
    return write_run_folder(Converted(cfg, weights, tok), path)


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory, tokenizer_dir) -> Path:
    cfg = ModelConfig(arch="mbart", n_encoder_layer=1, n_layer=1, n_head=2, n_embd=32, intermediate_size=64,
                      block_size=64)
    return run_folder(tmp_path_factory.mktemp("s2s") / "run", cfg, tokenizer_dir)


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory, tokenizer_dir) -> Path:
    cfg = ModelConfig(arch="llama", n_layer=1, n_head=2, n_kv_head=2, n_embd=32, intermediate_size=64,
                      block_size=128, bias=False)
    return run_folder(tmp_path_factory.mktemp("dec") / "run", cfg, tokenizer_dir)


def eval_json(capsys, *argv: str) -> dict:
    assert main(["eval", "--task", "text2text", "--split", "all", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_text2text_encoder_decoder_writes_predictions(seq2seq_run, pair_file, capsys):
    res = eval_json(capsys, "--model", str(seq2seq_run), "--data", str(pair_file), "--max-new-tokens", "6")
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match", "examples",
                "bleu_signature", "chrf_signature", "truncated"):
        assert key in res, key
    assert res["examples"] == len(PAIRS) and res["kind"] == "encoder-decoder" and res["max_new_tokens"] == 6
    rows = [json.loads(line) for line in (seq2seq_run / "predictions.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == [p["source"] for p in PAIRS]
    assert [r["reference"] for r in rows] == [p["target"] for p in PAIRS]
    assert all(isinstance(r["prediction"], str) and r["finish_reason"] in ("eos", "length") for r in rows)
    assert res["truncated"] == sum(r["finish_reason"] == "length" for r in rows)
    # The scores are those of the written predictions.
    again = text2text_scores([r["prediction"] for r in rows], [r["reference"] for r in rows])
    assert again["chrf"] == pytest.approx(res["chrf"]) and again["bleu"] == pytest.approx(res["bleu"])
    # --predictions FILE, --limit, beam search
    out = seq2seq_run.parent / "elsewhere" / "beam.jsonl"
    res = eval_json(capsys, "--model", str(seq2seq_run), "--data", str(pair_file), "--max-new-tokens", "4",
                    "--beam", "2", "--limit", "3", "--predictions", str(out))
    assert res["examples"] == 3 and res["beam"] == 2 and len(out.read_text().splitlines()) == 3


def test_eval_text2text_decoder_uses_the_sft_prompt(decoder_run, pair_file, tmp_path, capsys):
    res = eval_json(capsys, "--model", str(decoder_run), "--data", str(pair_file), "--max-new-tokens", "5",
                    "--limit", "2", "--batch-size", "2")
    assert res["kind"] == "decoder" and res["instruction"] == FinetuneConfig().instruction
    rows = [json.loads(line) for line in (decoder_run / "predictions.jsonl").read_text().splitlines()]
    # Each prediction is what the model answers, alone, to SFT's prompt for that source.
    got = load_model(decoder_run)
    tok = got.tokenizer
    for row in rows:
        ids = tok.encode_prompt(sft_prompt(tok, row["source"], FinetuneConfig().instruction))
        alone = generate(got.model, tok, [ids], SamplingConfig(max_new_tokens=5, temperature=0.0),
                         eos_ids=set(end_of_turn_ids(tok)))[0]
        assert row["prediction"] == alone.text.strip()
    # An SFT run's own instruction is used, and may not be overridden.
    sft = tmp_path / "sft"
    shutil.copytree(decoder_run, sft, ignore=shutil.ignore_patterns("predictions.jsonl"))
    run = FinetuneRunConfig(model=got.cfg, finetune=FinetuneConfig(task="sft", instruction="Say it plainly:"))
    save_yaml(run, sft / "config.yaml")
    res = eval_json(capsys, "--model", str(sft), "--data", str(pair_file), "--max-new-tokens", "3", "--limit", "1")
    assert res["instruction"] == "Say it plainly:"
    assert main(["eval", "--task", "text2text", "--model", str(sft), "--data", str(pair_file), "--split", "all",
                 "--instruction", "Other:"]) == 2
    assert "differs from the one" in capsys.readouterr().err


def test_bad_input_is_one_line_error_and_writes_nothing(seq2seq_run, decoder_run, pair_file, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    base = ["eval", "--task", "text2text", "--data", str(pair_file), "--split", "all", "--predictions", str(out)]
    assert main([*base, "--model", str(seq2seq_run), "--beam", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --beam must be at least 1, got 0"
    assert main([*base, "--model", str(decoder_run), "--beam", "3"]) == 2
    assert "beam search is for encoder" in capsys.readouterr().err
    assert main([*base, "--model", str(seq2seq_run), "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err
    assert not out.exists()
    assert main(["eval", "--task", "text2text", "--model", "smollm2-135m-instruct", "--data", str(pair_file)]) == 2
    assert "give --predictions FILE" in capsys.readouterr().err
