import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llmkit.config import RunConfig, build, load_run_config
from llmkit.errors import CheckpointError, ConfigError
from llmkit.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]
LLMKIT = [sys.executable, "-m", "llmkit.cli.main"]


def tiny_run_config(data_dir: Path, **train) -> dict:
    return {
        "model": {"arch": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "block_size": 64,
                  "bias": False, "dropout": 0.1},
        "data": {"path": str(data_dir), "batch_size": 8},
        "train": {"max_steps": 20, "warmup_steps": 5, "lr": 3e-3, "eval_interval": 5, "eval_iters": 2,
                  "log_interval": 1, **train},
    }


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec["loss"]
    return out


def test_loss_falls_and_the_run_folder_is_complete(tmp_path, data_dir):
    cfg = build(RunConfig, tiny_run_config(data_dir, max_steps=60, eval_interval=30))
    result = pretrain(cfg, tmp_path / "run", quiet=True)
    run = tmp_path / "run"
    log = losses(run)
    assert sum(list(log.values())[-5:]) / 5 < log[1] - 1.0  # a clear drop on real text in 60 steps
    assert result.best_val is not None and result.best_val < log[1]
    for name in ("config.yaml", "model.safetensors", "metrics.jsonl", "loss.png", "tokenizer/tokenizer.json",
                 "checkpoints/latest"):
        assert (run / name).exists(), name
    saved = load_run_config(run / "config.yaml")
    assert saved.model.vocab_size == 512 and saved.train.max_steps == 60
    val_lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert {"val_loss", "val_perplexity", "val_bits_per_byte"} <= set(val_lines[-1])
    step_lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert {"tokens_per_s", "mfu", "lr"} <= set(step_lines[-1])


@pytest.mark.slow
def test_resume_after_kill_gives_identical_losses(tmp_path, data_dir):
    """20 steps straight == 10 steps, SIGKILL mid-run, `--resume` for the rest (dropout on, bf16 auto)."""
    cfg = tiny_run_config(data_dir, save_interval=10)
    straight = tmp_path / "straight"
    pretrain(build(RunConfig, cfg), straight, quiet=True)

    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        from llmkit.config import RunConfig, build
        from llmkit.train.pretrain import pretrain
        def die(step, _):
            if step == 13:  # past the step-10 checkpoint: steps 11-13 are lost work
                os.kill(os.getpid(), signal.SIGKILL)
        pretrain(build(RunConfig, {cfg!r}), {str(killed)!r}, quiet=True, callbacks=[die])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert max(losses(killed)) == 13
    resumed = subprocess.run([*LLMKIT, "pretrain", "--out", str(killed), "--resume", "--quiet"],
                             capture_output=True, text=True, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = losses(straight), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]


def test_config_typos_and_bad_values_are_errors(tmp_path, data_dir):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr' \(did you mean 'lr'\?\)"):
        build(RunConfig, {"train": {"lrr": 1e-3}})
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        build(RunConfig, {"modle": {}})
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        build(RunConfig, {"train": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match="n_embd .* divisible"):
        build(RunConfig, {"model": {"n_embd": 65, "n_head": 4}})
    with pytest.raises(ConfigError, match="unknown model preset"):
        build(RunConfig, {"model": "gpt5"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        load_run_config(bad)


def test_early_stopping_and_corrupt_checkpoint(tmp_path, data_dir):
    cfg = build(RunConfig, tiny_run_config(data_dir, lr=0.0, warmup_steps=1, early_stop_patience=1))
    result = pretrain(cfg, tmp_path / "run", quiet=True)
    assert result.stopped_early and result.step == 10  # evals at 5 and 10; no improvement at 10
    ckpt = tmp_path / "run" / "checkpoints" / "step_000010" / "model.safetensors"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="step_000010/model.safetensors.*truncated"):
        pretrain(cfg, tmp_path / "run", resume=True, quiet=True)
    assert (tmp_path / "run" / "checkpoints" / "step_000005" / "model.safetensors").exists()  # earlier one kept


def test_select_metric_picks_the_best_weights(tmp_path, data_dir, monkeypatch):
    """model.safetensors holds the weights of the best evaluation, not the last: validation losses are scripted
    (3.0, 2.0, 2.5 at steps 5, 10, 15), so the best weights are step 10's checkpoint and differ from step 15's."""
    import llmkit.train.loop
    from llmkit.model.weights import load_weights

    scripted = iter([3.0, 2.0, 2.5])
    monkeypatch.setattr(llmkit.train.loop, "evaluate", lambda *a, **k: {"loss": next(scripted)})
    cfg = build(RunConfig, tiny_run_config(data_dir, max_steps=15, select_metric="val_bits_per_byte"))
    result = pretrain(cfg, tmp_path / "run", quiet=True)
    run = tmp_path / "run"
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert [e["val_loss"] for e in evals] == [3.0, 2.0, 2.5]
    assert result.best_val == min(e["val_bits_per_byte"] for e in evals) == evals[1]["val_bits_per_byte"]
    best = load_weights(run / "model.safetensors")
    at_10 = load_weights(run / "checkpoints" / "step_000010" / "model.safetensors")
    at_15 = load_weights(run / "checkpoints" / "step_000015" / "model.safetensors")
    assert best.keys() == at_10.keys()
    assert all(torch.equal(best[k], at_10[k]) for k in best)
    assert any(not torch.equal(best[k], at_15[k]) for k in best)


def test_select_metric_that_is_not_measured_is_an_error(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="select_metric: 'val_acuracy' is not measured"):
        build(RunConfig, tiny_run_config(data_dir, max_steps=5, select_metric="val_acuracy"))  # before training


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path, data_dir):
    """2 micro-batches of 4 == 1 batch of 8 (same windows, same order): the loop averages correctly."""
    base = tiny_run_config(data_dir, max_steps=3, eval_interval=0, dtype="float32")
    base["model"]["dropout"] = 0.0
    big = build(RunConfig, base)
    small = build(RunConfig, {**base, "data": {**base["data"], "batch_size": 4},
                              "train": {**base["train"], "grad_accum": 2}})
    pretrain(big, tmp_path / "big", quiet=True)
    pretrain(small, tmp_path / "small", quiet=True)
    a, b = losses(tmp_path / "big"), losses(tmp_path / "small")
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a)
