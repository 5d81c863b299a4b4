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


def _tok_with_bad_config(tmp_path: Path, tokenizer_dir: Path) -> Path:
    import shutil

    tok = tmp_path / "badtok"
    shutil.copytree(tokenizer_dir, tok)
    (tok / "tokenizer_config.json").write_text('{"eos_token": ')
    return tok


@pytest.mark.parametrize("argv, message", [
    # invalid config values are caught when the config is built, before a run folder is touched
    (["--data.batch_size", "0"], "data.batch_size: must be a positive integer"),
    (["--train.grad_accum", "0"], "train.grad_accum: must be a positive integer, got 0"),
    (["--train.log_interval", "0"], "train.log_interval: must be a positive integer, got 0"),
    (["--train.max_steps", "0"], "train.max_steps: must be a positive integer, got 0"),
    (["--train.lr", "nan"], "train.lr: must be a finite number >= 0 (0 freezes the weights), got nan"),
    (["--model.n_kv_head", "0"], "model.n_kv_head: must be a positive integer"),
    (["--model.n_embd", "36", "--model.n_head", "4"], "need an even head dimension"),
    (["--train.select_metric", "val_acuracy"], "'val_acuracy' is not measured by objective causal_lm (valid: "
                                               "val_loss, val_perplexity, val_bits_per_byte)"),
    (["--model.n_layer", str(10**12)], "model.n_layer: must be a positive integer (at most 1,024)"),
])
def test_bad_config_values_fail_before_training(capsys, tmp_path, data_dir, argv, message):
    cfg = tmp_path / "llama.yaml"
    cfg.write_text("model:\n  arch: llama\n  n_layer: 1\n  n_head: 2\n  n_embd: 16\n  block_size: 16\n"
                   "train:\n  max_steps: 2\n")
    code, _, err = run(capsys, "pretrain", "--config", cfg, "--data", data_dir, "--out", tmp_path / "run", "--quiet",
                       *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run").exists()  # nothing written for a config that cannot run


def test_bad_files_are_one_line(capsys, tmp_path, data_dir, tokenizer_dir):
    """Invalid UTF-8, a corrupt meta.json or tokenizer_config.json, an output path under a file, a full disk:
    each is one `error:` line naming the file, exit status 2."""
    import shutil

    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_bytes(b'{"text": "caf\xe9"}\n')
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "meta.json").write_text("{truncated")
    (tmp_path / "file.txt").write_text("a file, not a folder\n")
    cases = [
        (["prepare", "--corpus", bad_jsonl, "--tokenizer", tokenizer_dir, "--out", tmp_path / "o", "--quiet"],
         "bad.jsonl:1: not UTF-8 text (invalid byte at offset 13)"),
        (["prepare", "--corpus", tmp_path / "file.txt", "--tokenizer", _tok_with_bad_config(tmp_path, tokenizer_dir),
          "--out", tmp_path / "o", "--quiet"], "tokenizer_config.json: not a readable JSON file"),
        (["pretrain", "--config", ROOT / "configs" / "demo.yaml", "--data", data, "--out", tmp_path / "r"],
         "meta.json: not a readable JSON file"),
        (["prepare", "--corpus", tmp_path / "file.txt", "--tokenizer", tokenizer_dir, "--out",
          tmp_path / "file.txt" / "sub", "--quiet"], "file.txt/sub: Not a directory"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, (argv, err)
    assert (tmp_path / "file.txt").read_text() == "a file, not a folder\n"


def test_os_errors_name_the_path(capsys, tmp_path, data_dir, monkeypatch):
    """A full disk (or a read-only folder) while writing the run folder: `error: cannot write PATH: why`."""
    import errno

    import llmkit.config.machinery
    from llmkit.cli.main import os_error_line

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(llmkit.config.machinery, "atomic_write_text", full)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  n_layer: 1\n  n_head: 2\n  n_embd: 16\n  block_size: 16\n")
    code, _, err = run(capsys, "pretrain", "--config", cfg, "--data", data_dir, "--out", tmp_path / "run", "--quiet")
    assert code == 2 and err == f"error: cannot write {tmp_path / 'run' / 'config.yaml'}: No space left on device\n"
    denied = PermissionError(errno.EACCES, "Permission denied", "runs/x/config.yaml")
    assert os_error_line(denied) == "cannot write runs/x/config.yaml: Permission denied"


@pytest.mark.parametrize("verb", [["eval", "--data", "d"], ["classify", "--text", "t"], ["embed", "--text", "t"],
                                  ["search", "--corpus", "c", "--query", "q"]])
@pytest.mark.parametrize("value", ["0", "-3", "nan"])
def test_count_options_are_checked_by_argparse(capsys, verb, value):
    with pytest.raises(SystemExit) as e:
        main([verb[0], "--model", "m", *verb[1:], "--top-k" if verb[0] == "search" else "--batch-size", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line][0].endswith(
        f"must be an integer from 1 to 2,147,483,647, got {value}" if value != "nan" else "expected an integer, "
        "got 'nan'")


def test_select_metric_table_covers_every_objective():
    """config.OBJECTIVE_METRICS (what train.select_metric is checked against) names every registered objective."""
    from llmkit.config.sections import OBJECTIVE_METRICS
    from llmkit.train.objectives import OBJECTIVES

    assert set(OBJECTIVE_METRICS) == set(OBJECTIVES)
    assert all("val_loss" in names for names in OBJECTIVE_METRICS.values())


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_builds(path):
    """A recipe in configs/ with a stale or misspelt key would only fail when a user runs it: each one builds
    through the config machinery, where unknown keys and bad values are errors."""
    from llmkit.config import DistillRunConfig, FinetuneRunConfig, RunConfig
    from llmkit.config.machinery import build, load_yaml

    values = load_yaml(path)
    cls = DistillRunConfig if "kd" in values else FinetuneRunConfig if "finetune" in values else RunConfig
    cfg = build(cls, values)
    assert cfg.train.lr > 0
