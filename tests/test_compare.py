"""`llmkit compare`: size, speed, perplexity, ΔPPL, KL and same-top-token of models sharing a tokenizer (tiny run
folders and GGUF files of them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers_convert import chat_tokenizer, make_run_folder
from llmkit.cli.main import main
from llmkit.compress.compare import compare, pareto, table
from llmkit.errors import ConfigError
from llmkit.infer.api import load
from llmkit.infer.evaluate import evaluate_lm
from llmkit.interop.gguf_write import write_gguf

FAST = dict(decode_tokens=4, speed_reps=1, quiet=True)
KEYS = {"model", "bytes", "perplexity", "delta_ppl", "delta_ppl_pct", "kl_divergence", "same_top_token",
        "decode_tokens_per_s"}


@pytest.fixture(scope="module")
def models(tmp_path_factory, corpus_file) -> dict[str, Path]:
    """A tiny llama run folder, its GGUF q8_0 / q4_0 exports, another seed, and one with another tokenizer."""
    root = tmp_path_factory.mktemp("compare")
    tok = chat_tokenizer(corpus_file.read_text()[:100_000])
    shape = dict(n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128, block_size=128)
    base = make_run_folder(root / "base", "llama", tok, **shape)
    out = {"base": base, "other_seed": make_run_folder(root / "other", "llama", tok, seed=1, **shape),
           "other_tok": make_run_folder(root / "tok2", "llama", chat_tokenizer(corpus_file.read_text()[:50_000], 280),
                                        **shape)}
    for q in ("q8_0", "q4_0"):
        out[q] = Path(write_gguf(base, root / f"base-{q}.gguf", quant=q, quiet=True)["path"])
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory, corpus_file) -> Path:
    path = tmp_path_factory.mktemp("text") / "held-out.txt"
    path.write_text(corpus_file.read_text()[150_000:152_500], encoding="utf-8")
    return path


@pytest.fixture(scope="module", autouse=True)
def _home(tmp_path_factory):
    """GGUF sources convert once into a private cache for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMKIT_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.fixture(scope="module")
def rows(models, text) -> list[dict]:
    return compare([models["base"], models["q8_0"], models["q4_0"]], text, max_tokens=300, **FAST)


def test_a_model_against_itself_is_identical_and_bf16_close(models, text):
    a, b, bf16 = compare([models["base"], models["base"], (models["base"], "bfloat16")], text, max_tokens=150,
                         **FAST)
    assert b["kl_divergence"] <= 1e-6 and b["same_top_token"] == 100.0 and b["delta_ppl"] == 0.0
    assert KEYS <= set(b) and a["bytes"] == (models["base"] / "model.safetensors").stat().st_size
    assert bf16["dtype"] == "bfloat16" and bf16["model"].endswith("(bfloat16)")
    assert 0 < bf16["kl_divergence"] < 0.01 and bf16["bytes"] == a["bytes"]


def test_quantised_exports_rank_as_expected(models, rows):
    base, q8, q4 = rows
    assert 0 < q8["kl_divergence"] < q4["kl_divergence"]
    assert q8["same_top_token"] >= q4["same_top_token"] and q8["same_top_token"] > 90
    assert abs(q8["delta_ppl_pct"]) < abs(q4["delta_ppl_pct"]) or abs(q8["delta_ppl_pct"]) < 0.5
    assert q8["bytes"] == models["q8_0"].stat().st_size and q4["bytes"] < q8["bytes"] < base["bytes"]
    assert q8["size_ratio"] == pytest.approx(q8["bytes"] / base["bytes"])
    assert all(r["decode_tokens_per_s"] > 0 for r in (base, q8, q4))


def test_perplexity_equals_llmkit_eval(models, text):
    """Same windows as `llmkit eval`: with the model's whole context and every token, the same perplexity."""
    llm = load(models["base"], device="cpu")
    want = evaluate_lm(llm, text, context=128, quiet=True)
    got = compare([models["base"]], text, max_tokens=10**6, context=128, **FAST)[0]
    assert got["predicted_tokens"] == want["predicted_tokens"]
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)


def test_kl_and_same_top_token_match_a_direct_computation(models, text):
    ours = compare([models["base"], models["other_seed"]], text, max_tokens=200, context=100, **FAST)[1]
    a, b = load(models["base"], device="cpu"), load(models["other_seed"], device="cpu")
    ids = torch.tensor(a.tokenizer.encode(text.read_text()))[:200]
    with torch.no_grad():
        kls, same = [], 0
        for s in range(0, 199, 100):  # the same two windows
            x = ids[None, s:min(s + 100, 199)]
            V = a.model.cfg.vocab_size
            lp, lq = (F.log_softmax(m.model(x).logits[0, :, :V], -1) for m in (a, b))
            kls.append(F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1))
            same += int((lp.argmax(-1) == lq.argmax(-1)).sum())
    kl = torch.cat(kls)
    assert ours["kl_divergence"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert ours["same_top_token"] == pytest.approx(100 * same / len(kl))
    assert ours["kl_divergence"] > 0.001  # two random models really differ


def test_cli_json_lines_and_plot(models, text, tmp_path, capsys):
    png = tmp_path / "pareto.png"
    args = ["compare", "--model", str(models["base"]), "--model", str(models["q4_0"]), "--data", str(text),
            "--max-tokens", "200", "--decode-tokens", "4", "--speed-reps", "1", "--json", "--plot", str(png)]
    assert main(args) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(got) == 2 and all(KEYS <= set(r) for r in got) and got[1]["model"] == str(models["q4_0"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table(rows, models):
    lines = table(rows).splitlines()
    assert len(lines) == 5 and "same top %" in lines[0] and "KLD" in lines[0]  # header, 3 rows, note
    assert lines[3].startswith(str(models["q4_0"])) and "+0.00" in lines[1]


def test_different_tokenizers_are_a_one_line_error(models, text, tmp_path, capsys):
    png = tmp_path / "p.png"
    assert main(["compare", "--model", str(models["base"]), "--model", str(models["other_tok"]), "--data",
                 str(text), "--plot", str(png), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "different tokenizer" in err and "tok2" in err
    assert not png.exists()


def test_bad_arguments(models, text, tmp_path, capsys):
    assert main(["compare", "--model", str(models["base"]), "--data", str(text), "--plot", str(tmp_path / "x")]) == 2
    assert "ending in .png" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--context"):
        compare([models["base"]], text, context=1)
    assert main(["compare", "--model", str(models["base"]), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_pareto_frontier():
    pts = [(1.0, 5.0), (2.0, 4.0), (3.0, 4.5), (0.5, 9.0), (2.0, 4.0)]
    assert pareto(pts) == [0, 1, 3, 4]  # (3, 4.5) is beaten by (2, 4); ties both stay
