"""`llmkit explain` end to end on tiny run folders: every file written and consistent with report.json, the --json
shape, --layer/--head focus, and bad input as one `error:` line (exit 2) with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers_convert import chat_tokenizer, make_classifier_run, make_run_folder
from llmkit.cli.main import main

TEXT = "The king is dead, long live the king"


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_file) -> dict[str, Path]:
    from llmkit.data.wordpiece import train_wordpiece

    root = tmp_path_factory.mktemp("explain")
    text = corpus_file.read_text()[:50_000]
    tok = chat_tokenizer(text)
    return {"llama": make_run_folder(root / "llama", "llama", tok),
            "gpt2": make_run_folder(root / "gpt2", "gpt2", tok),
            "classifier": make_classifier_run(root / "clf", "llama", tok),
            "encoder": make_run_folder(root / "bert", "bert", train_wordpiece([text], vocab_size=300))}


def one_token(run_dir: Path) -> str:
    """A token the run's tokenizer encodes as exactly one id (a valid --target)."""
    from llmkit.data.tokenizer import Tokenizer

    tok = Tokenizer.load(run_dir / "tokenizer")
    return next(w for w in (" the", " king", "the", "e") if len(tok.encode(w)) == 1)


@pytest.mark.slow
def test_explain_writes_every_output_and_one_json_object(runs, tmp_path, capsys):
    out = tmp_path / "ex"
    code, stdout, err = run(capsys, "explain", "--model", runs["llama"], "--text", TEXT, "--out", out, "--json",
                            "--ig-steps", "8")
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    got = json.loads(lines[0])
    report = json.loads((out / "report.json").read_text())
    t, n_layer, n_head = len(report["tokens"]), report["n_layer"], report["n_head"]
    assert got["tokens"] == report["tokens"] and t > 3
    assert len(got["logit_lens"]) == n_layer + 1 and all(len(row) == t for row in got["logit_lens"])
    assert {"token", "prob"} <= set(got["logit_lens"][-1][-1])
    assert "layers" not in got["attention"] and "rollout" not in got  # the matrices stay in report.json
    assert len(report["attention"]["layers"]) == n_layer and len(report["attention"]["layers"][0]) == n_head
    assert len(report["attention"]["layers"][0][0]) == t and len(report["rollout"]) == t
    files = got["files"]
    assert files["attention"] == [str(out / "attention" / f"layer_{i:02d}.png") for i in range(n_layer)]
    for key in ("report", "page", "rollout", "logit_lens", "attributions", "bertviz"):
        assert Path(files[key]).is_file() and Path(files[key]).parent == out, key
    for p in files["attention"] + [files["rollout"], files["logit_lens"], files["attributions"]]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bertviz = json.loads((out / "bertviz.json").read_text())
    assert bertviz["attention"][0]["attn"] == report["attention"]["layers"]
    assert bertviz["attention"][0]["left_text"] == report["tokens"]
    html = (out / "index.html").read_text()
    assert "http:" not in html and "https:" not in html and '<script src' not in html  # nothing to fetch
    for method in report["methods"]:  # a progress line per method on stderr
        assert f"explain: {method} " in err
    assert not list(out.parent.glob(".*.tmp"))


@pytest.mark.slow
def test_human_summary_target_and_focus(runs, tmp_path, capsys):
    target = one_token(runs["gpt2"])
    out = tmp_path / "ex"
    code, stdout, err = run(capsys, "explain", "--model", runs["gpt2"], "--text", TEXT, "--target", target,
                            "--layer", "1", "--head", "2", "--out", out, "--ig-steps", "4")
    assert code == 0, err
    assert f"target: next token {target!r}" in stdout
    assert "logit lens:" in stdout and "top attributed tokens (integrated gradients)" in stdout
    assert str(out / "index.html") in stdout
    assert sorted(p.name for p in (out / "attention").iterdir()) == ["layer_01.png"]  # --layer narrows the grids
    report = json.loads((out / "report.json").read_text())
    assert report["focus"] == {"layer": 1, "head": 2} and report["target"]["token"] == target
    assert '"focus": {"layer": 1, "head": 2}' in (out / "index.html").read_text()

    # the same folder again: an earlier explain output is replaced whole (no stale layer_01.png)
    code, _, err = run(capsys, "explain", "--model", runs["gpt2"], "--text", TEXT, "--layer", "0", "--methods",
                       "attention", "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in (out / "attention").iterdir()) == ["layer_00.png"]
    assert not (out / "logit_lens.png").exists() and not (out / "attributions.png").exists()


@pytest.mark.slow
def test_classifier_explains_its_label(runs, tmp_path, capsys):
    out = tmp_path / "ex"
    code, stdout, err = run(capsys, "explain", "--model", runs["classifier"], "--text", "a fine film",
                            "--label", "pos", "--out", out, "--json", "--ig-steps", "4")
    assert code == 0, err
    got = json.loads(stdout)
    assert got["kind"] == "classifier" and got["target"]["label"] == "pos"
    assert all(len(row) == 1 for row in got["logit_lens"])  # one position: the pooled text, read as classes
    assert len(got["attributions"]["integrated_gradients"]) == len(got["tokens"])
    assert (out / "attributions.png").is_file() and (out / "index.html").is_file()


@pytest.mark.parametrize(("model", "extra", "message"), [
    ("llama", ["--layer", "2"], "--layer 2 is out of range"),
    ("llama", ["--head", "4"], "--head 4 is out of range"),
    ("llama", ["--target", "the king is dead"], "give exactly one token"),
    ("llama", ["--methods", "attention,lime"], "unknown method 'lime'"),
    ("llama", ["--label", "pos"], "--label needs a fine-tuned classifier"),
    ("classifier", ["--label", "meh"], "--label 'meh' is not a class"),
    ("encoder", ["--methods", "integrated-gradients"], "cannot do 'integrated-gradients'"),
    ("llama", ["--text", "  "], "--text is empty"),
    ("llama", ["--text-file", "{tmp}/missing.txt"], "--text-file {tmp}/missing.txt: no such file"),
])
def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, model, extra, message):
    out = tmp_path / "ex"
    text = [] if "--text" in extra or "--text-file" in extra else ["--text", TEXT]
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, stdout, err = run(capsys, "explain", "--model", runs[model], *text, *extra, "--out", out)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert message.replace("{tmp}", str(tmp_path)) in err.strip().splitlines()[-1]
    assert [line for line in err.splitlines() if line.startswith("error")] == [err.strip().splitlines()[-1]]
    assert not out.exists() and stdout == ""


def test_out_folder_of_other_files_is_refused_and_kept(runs, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, "explain", "--model", runs["llama"], "--text", TEXT, "--out", out)
    assert code == 2 and "holds other files" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    code, _, err = run(capsys, "explain", "--model", runs["llama"], "--text", TEXT, "--text-file", out / "notes.txt",
                       "--out", tmp_path / "x")
    assert code == 2 and "one of them" in err


@pytest.mark.slow
def test_a_failure_while_writing_leaves_nothing_half_written(runs, tmp_path, capsys, monkeypatch):
    import llmkit.explain.page

    def broken(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device", str(tmp_path / "ex" / "index.html"))

    monkeypatch.setattr(llmkit.explain.page, "write_page", broken)
    out = tmp_path / "ex"
    code, _, err = run(capsys, "explain", "--model", runs["llama"], "--text", TEXT, "--methods", "attention",
                       "--out", out)
    assert code == 2 and "No space left on device" in err
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))  # report.json and the PNGs went with it
