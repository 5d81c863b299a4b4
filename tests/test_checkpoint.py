"""Checkpoints and run folders under faults: pruning by step number, `latest` that never dangles, fsync before
rename, leftovers of a kill cleared, a cut-short metrics line survived, and no silent mixing of two runs."""

import json

import pytest
import yaml
from torch import nn

import llmkit.files
from llmkit.cli.main import main
from llmkit.config import RunConfig, build
from llmkit.errors import CheckpointError, ConfigError
from llmkit.tasks.finetune import finetune, finetune_config
from llmkit.train.checkpoint import latest_checkpoint, save_checkpoint, start_run_folder, truncate_metrics
from llmkit.train.pretrain import pretrain


def tiny_run(data_dir, **train) -> dict:
    return {"model": {"arch": "llama", "n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 32, "block_size": 32,
                      "bias": False, "tie_embeddings": False},
            "data": {"path": str(data_dir), "batch_size": 4},
            "train": {"max_steps": 6, "warmup_steps": 1, "eval_interval": 0, "save_interval": 3, "log_interval": 1,
                      "eval_iters": 1,
                      "dtype": "float32", "device": "cpu", **train}}


def names(root) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_pruning_goes_by_step_number_not_name(tmp_path):
    """step_1000000 sorts before step_999999 as a name: pruning by name deleted the checkpoint just written."""
    model = nn.Linear(2, 2)
    for step in (999_998, 999_999, 1_000_000):
        save_checkpoint(tmp_path, step, model, {"step": step})
    root = tmp_path / "checkpoints"
    assert names(root) == ["latest", "step_1000000", "step_999999"]
    assert latest_checkpoint(tmp_path) == root / "step_1000000"


def test_pruning_keeps_the_new_checkpoint_beside_a_longer_runs(tmp_path):
    """Only checkpoints older than the one just written are pruned; `latest` names an existing folder."""
    model = nn.Linear(2, 2)
    for step in (100, 200, 300):
        save_checkpoint(tmp_path, step, model, {"step": step})
    save_checkpoint(tmp_path, 10, model, {"step": 10})
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000010"
    assert latest_checkpoint(tmp_path) == root / "step_000010"
    assert names(root) == ["latest", "step_000010", "step_000200", "step_000300"]


def test_checkpoint_files_and_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_replace = llmkit.files.os.replace
    monkeypatch.setattr(llmkit.files, "fsync_path", lambda p: synced.append(str(p)))
    monkeypatch.setattr(llmkit.files.os, "replace", lambda a, b: (synced.append(f"rename {b}"), real_replace(a, b)))
    save_checkpoint(tmp_path, 5, nn.Linear(2, 2), {"step": 5})
    at = synced.index(f"rename {tmp_path / 'checkpoints' / 'step_000005'}")
    before = synced[:at]
    assert any(p.endswith("/state.pt") for p in before), synced
    assert any(p.endswith("/model.safetensors") for p in before), synced
    assert any(p.endswith(".tmp") and "/.step_000005." in p for p in before), synced  # the folder itself
    assert str(tmp_path / "checkpoints") in synced[at:]  # the parent, after the rename


def test_resume_falls_back_when_latest_is_missing_or_corrupt(tmp_path):
    model = nn.Linear(2, 2)
    for step in (5, 10):
        save_checkpoint(tmp_path, step, model, {"step": step})
    root = tmp_path / "checkpoints"
    (root / "latest").unlink()
    assert latest_checkpoint(tmp_path) == root / "step_000010"
    (root / "latest").write_bytes(b"\xff\xfe garbage")
    assert latest_checkpoint(tmp_path) == root / "step_000010"
    (root / "latest").write_text("step_000020\n")  # names a folder that is gone
    assert latest_checkpoint(tmp_path) == root / "step_000010"
    state = root / "step_000010" / "state.pt"
    state.write_bytes(state.read_bytes()[:20])  # incomplete: skipped, the older complete one is used
    assert latest_checkpoint(tmp_path) == root / "step_000005"
    (root / "step_000005" / "model.safetensors").unlink()
    assert latest_checkpoint(tmp_path) is None


def test_truncate_metrics_drops_a_cut_short_last_line_but_names_a_bad_middle_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 5)) + '{"step": 5, "lo')
    truncate_metrics(path, 3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    path.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(CheckpointError, match=r"metrics.jsonl:2: not a metrics record"):
        truncate_metrics(path, 3)


@pytest.mark.slow
def test_resume_survives_a_cut_short_metrics_line_and_clears_leftovers(tmp_path, data_dir):
    run = tmp_path / "run"
    pretrain(build(RunConfig, tiny_run(data_dir)), run, quiet=True)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 4.1')  # what SIGKILL during a write leaves
    ck = run / "checkpoints"
    leftovers = [ck / ".step_000009.k2j4h1", ck / ".step_000009.ab12cd.tmp", ck / ".latest.x1y2.tmp",
                 run / ".model.safetensors.q9r8.tmp", run / ".metrics.jsonl.abc.tmp"]
    for p in leftovers[:2]:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"half")
    for p in leftovers[2:]:
        p.write_text("half")
    keep = [run / "notes.txt", run / ".hidden", ck / "README"]
    for p in keep:
        p.write_text("mine")
    pretrain(build(RunConfig, tiny_run(data_dir, max_steps=9)), run, resume=True, quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 10))
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 9]
    assert not any(p.exists() for p in leftovers)
    assert all(p.read_text() == "mine" for p in keep)
    assert latest_checkpoint(run) == ck / "step_000009"


@pytest.mark.slow
def test_a_fresh_run_into_a_used_folder_is_refused_unless_overwrite(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run(data_dir, max_steps=9)))
    assert main(["pretrain", "--config", str(cfg), "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    (run / "notes.txt").write_text("mine")
    (run / "tensorboard").mkdir()
    (run / "eval.json").write_text("{}")
    assert main(["pretrain", "--config", str(cfg), "--out", str(run), "--max-steps", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds an earlier run" in err and "--resume" in err and "--overwrite" in err
    assert (run / "checkpoints" / "step_000009").is_dir()  # untouched
    assert main(["pretrain", "--config", str(cfg), "--out", str(run), "--max-steps", "3", "--resume",
                 "--overwrite"]) == 2
    assert "contradict" in capsys.readouterr().err

    assert main(["pretrain", "--config", str(cfg), "--out", str(run), "--max-steps", "3", "--quiet",
                 "--overwrite"]) == 0
    assert names(run / "checkpoints") == ["latest", "step_000003"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert (run / "notes.txt").read_text() == "mine" and (run / "tokenizer").is_dir()
    assert not (run / "tensorboard").exists() and not (run / "eval.json").exists()


def test_only_rank_0_deletes(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / ".metrics.jsonl.x.tmp").write_text("")
    monkeypatch.setenv("RANK", "1")
    start_run_folder(tmp_path, resume=False, overwrite=True)
    assert names(tmp_path) == [".metrics.jsonl.x.tmp", "checkpoints", "metrics.jsonl"]
    monkeypatch.setenv("RANK", "0")
    start_run_folder(tmp_path, resume=False, overwrite=True)
    assert names(tmp_path) == []


def test_finetune_into_a_used_folder_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    cfg = finetune_config(None, {"finetune.base": "some-model", "data.path": "movie-reviews"})
    with pytest.raises(ConfigError, match=r"holds an earlier run \(model.safetensors\): pass --resume .* --overwrite"):
        finetune(cfg, tmp_path, quiet=True)
    assert (tmp_path / "model.safetensors").read_bytes() == b"x"

