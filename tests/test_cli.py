"""The CLI end to end, and its promise: bad input is one `error:` line with exit status 2, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmkit.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_file):
    """tokenizer train -> prepare -> pretrain through the CLI, once for the module."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["tokenizer", "train", "--corpus", str(corpus_file), "--vocab-size", "400", "--out",
                 str(root / "tok")]) == 0
    assert main(["prepare", "--corpus", str(corpus_file), "--tokenizer", str(root / "tok"), "--out",
                 str(root / "data"), "--quiet"]) == 0
    cfg = root / "tiny.yaml"
    cfg.write_text("model:\n  preset: tiny\n  n_layer: 2\n  n_embd: 48\n  n_head: 4\n  n_kv_head: 4\n"
                   "  block_size: 64\ndata:\n  batch_size: 4\ntrain:\n  eval_interval: 10\n  eval_iters: 2\n")
    assert main(["pretrain", "--config", str(cfg), "--data", str(root / "data"), "--out", str(root / "run"),
                 "--max-steps", "20", "--train.warmup_steps", "2", "--quiet"]) == 0
    return root


def test_generate_and_eval_json(capsys, trained_run):
    code, out, _ = run(capsys, "generate", "--model", trained_run / "run", "--prompt", "ROMEO:", "--prompt", "KING:",
                       "--max-new-tokens", "12", "--temperature", "0", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["ROMEO:", "KING:"] and all(r["tokens"] == 12 for r in rows)
    code, out, _ = run(capsys, "eval", "--model", trained_run / "run", "--data", trained_run / "data", "--json")
    res = json.loads(out)
    assert code == 0 and {"loss", "perplexity", "bits_per_byte", "tokens"} <= set(res)
    assert 0 < res["bits_per_byte"] < 8


def test_console_script_help_lists_config_docs():
    out = subprocess.run([str(Path(sys.executable).parent / "llmkit"), "pretrain", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--train.lr" in out and "Peak learning rate" in out and "--model.n_kv_head" in out
    gen = subprocess.run([str(Path(sys.executable).parent / "llmkit"), "generate", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "Nucleus sampling" in gen and "--repetition-penalty" in gen


@pytest.mark.parametrize("argv, message", [
    (["prepare", "--corpus", "no/such/file.txt", "--tokenizer", "gpt2", "--out", "{tmp}/d"], "corpus not found"),
    (["prepare", "--corpus", "{tmp}/empty.txt", "--tokenizer", "gpt2", "--out", "{tmp}/d"], "is empty"),
    (["pretrain", "--config", "{tmp}/typo.yaml", "--out", "{tmp}/r"], "did you mean 'max_steps'"),
    (["pretrain", "--config", "{tmp}/missing.yaml"], "config file not found"),
    (["pretrain", "--config", "{tmp}/typo.yaml", "--train.nope", "1"], "unknown config key"),
    (["pretrain", "--out", "{tmp}/never", "--resume"], "config file not found"),
    (["generate", "--model", "{tmp}/no-run", "--prompt", "x"], "model not found"),
    (["generate", "--model", "{tmp}", "--prompt", "x", "--top-p", "2"], "--top-p must be in"),
    (["eval", "--model", "{tmp}/no-run", "--data", "{tmp}"], "model not found"),
    (["tokenizer", "train", "--corpus", "{tmp}/empty.txt", "--out", "{tmp}/t"], "empty"),
])
def test_bad_input_is_one_line(capsys, tmp_path, argv, message):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "typo.yaml").write_text("train:\n  max_step: 3\n")
    code, _, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and "it/s" not in line and "B/s" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
