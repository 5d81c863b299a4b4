"""The training loop's numerics and reporting: the MFU peak and FLOP count, fp16 loss scaling, TF32 scope,
LoRA defaults from any spelling of yes, TensorBoard beside metrics.jsonl."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_model_config
from llmkit import runtime
from llmkit.config import RunConfig, build
from llmkit.errors import ConfigError
from llmkit.model import build_model
from llmkit.tasks.classify import Classifier
from llmkit.tasks.finetune import finetune_config
from llmkit.train.pretrain import pretrain


def tiny_run(data_dir: Path, block_size: int = 64, batch_size: int = 8, **train) -> RunConfig:
    """The tiny_run_config pattern of test_train.py (2 layers x 64 wide, Shakespeare shards)."""
    return build(RunConfig, {
        "model": {"arch": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64,
                  "block_size": block_size, "bias": False},
        "data": {"path": str(data_dir), "batch_size": batch_size},
        "train": {"max_steps": 20, "warmup_steps": 5, "lr": 3e-3, "eval_interval": 10, "eval_iters": 2,
                  "log_interval": 1, "device": "cpu", **train},
    })


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------- the MFU peak


def test_peak_is_the_best_of_several_sizes_and_trials_and_leaves_the_rng_alone(monkeypatch):
    """The method on a simulated machine (a shared CPU times too loosely to test it on): throughput rises with
    size, and every third timing is slowed by noise."""
    rate = {64: 1e9, 128: 2e9, 256: 4e9, 2048: 4e9}  # FLOP/s per size; 2048 would take 4.3 s a product
    calls: list[tuple[int, int, float]] = []

    def simulated(a, b, out, reps):
        n = a.shape[0]
        seconds = reps * 2 * n**3 / rate[n] * (1.0, 1.3, 1.1)[len(calls) % 3]
        calls.append((n, reps, seconds))
        return seconds

    monkeypatch.setattr(runtime, "_timed", simulated)
    monkeypatch.setattr(runtime, "_PEAK", {})
    monkeypatch.setattr(runtime, "PEAK_SIZES", {"cpu": tuple(rate), "cuda": ()})
    rng = torch.get_rng_state()
    peak = runtime.peak_flops(torch.device("cpu"), torch.float32, trial_s=0.05, trials=3)
    assert torch.equal(rng, torch.get_rng_state())  # seeded runs draw the same numbers with or without MFU
    assert sorted({n for n, _, _ in calls}) == [64, 128, 256]  # 2048 would outlast the trials: not tried
    for n in (64, 128, 256):
        trials = [(reps, s) for m, reps, s in calls if m == n][-3:]  # after warm-up and calibration
        assert len({reps for reps, _ in trials}) == 1 and all(0.03 < s < 0.1 for _, s in trials)  # ~trial_s
    assert peak == pytest.approx(4e9)  # the best trial of the best size; noise only slows
    assert runtime.peak_flops(torch.device("cpu"), torch.float32) == peak  # measured once per process


def test_peak_measures_a_real_matmul(monkeypatch):
    monkeypatch.setattr(runtime, "_PEAK", {})
    monkeypatch.setattr(runtime, "PEAK_SIZES", {"cpu": (64, 128), "cuda": ()})
    rng = torch.get_rng_state()
    assert runtime.peak_flops(torch.device("cpu"), torch.float32, trial_s=0.01, trials=2) > 1e6
    assert torch.equal(rng, torch.get_rng_state())


# --------------------------------------------------------------------------------------------- FLOPs per token


def test_a_fully_trained_decoder_counts_6n_plus_attention():
    cfg = tiny_model_config("gpt2")  # tied head: the embedding is a matmul there
    model = build_model(cfg)
    T = 48
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
    assert model.flops_per_token(T) == 6 * model.num_params() + attention


def _lora_classifier(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    from peft import LoraConfig, get_peft_model

    backbone = build_model(tiny_model_config(arch))
    clf = Classifier(backbone, 3, "mean" if arch == "bert" else "last")
    peft = get_peft_model(clf, LoraConfig(r=4, target_modules=["qkv", "proj", "fc"], modules_to_save=["classifier"]))
    return backbone, peft


def _by_rule(backbone: torch.nn.Module, T: int) -> float:
    """The stated rule, by parameter name: frozen weights 4 FLOPs/token (2 for layer 0's q/k/v projection and
    the norms before it: no gradient flows below the first adapter), LoRA A 4 in layer 0's qkv (its input
    needs no gradient) and 6 elsewhere, LoRA B 6; heads and embedding lookups 0; attention 12·L·H·Q·T."""
    cfg = backbone.cfg
    total = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
    for name, p in backbone.named_parameters():
        if name.startswith(("embed", "pos_embed", "type_embed", "lm_head", "mlm", "nsp", "pooler")):
            continue
        below_first_adapter = name.startswith(("blocks.0.norm1", "blocks.0.attn.qkv.base_layer", "embed_norm"))
        if name.startswith("blocks.0.attn.qkv.lora_A"):
            total += 4 * p.numel()
        elif p.requires_grad:
            total += 6 * p.numel()
        else:
            total += (2 if below_first_adapter else 4) * p.numel()
    return total


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_a_lora_classifier_counts_what_runs_and_learns(arch):
    backbone, peft = _lora_classifier(arch)
    T = 32
    counted = backbone.flops_per_token(T, head_share=0.0)
    if arch == "bert":  # post-norm: norm1 follows the attention, and the embedding norm is frozen below layer 0
        assert counted == pytest.approx(_by_rule(backbone, T), rel=0.02)
    else:
        assert counted == _by_rule(backbone, T)
    six_n = 6 * backbone.num_params()
    assert counted < 0.75 * six_n  # frozen weights: no weight gradient; the LM/MLM head never runs


def test_the_weight_flops_match_torch_flop_counter():
    """An independent check: PyTorch's FlopCounterMode counts the matmuls one LoRA training step really runs."""
    backbone, peft = _lora_classifier("llama")  # no biases, RMSNorm: weights are (almost) all matmuls
    cfg, B, T = backbone.cfg, 4, 32
    x = torch.randint(0, cfg.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        peft(x, attention_mask_2d=torch.ones(B, T, dtype=torch.long)).logits.sum().backward()
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T  # CPU SDPA is not in the counter's table
    counted = backbone.flops_per_token(T, head_share=0.0) - attention
    assert counted == pytest.approx(counter.get_total_flops() / (B * T), rel=0.01)


# --------------------------------------------------------------------------------------------- fp16 and TF32


@pytest.mark.slow  # CPUs without AVX512-FP16 run fp16 matmuls slowly (here ~0.5 GFLOP/s): correct, not fast
def test_float16_on_cpu_trains_with_a_loss_scaler_that_resumes(tmp_path, data_dir):
    run = tmp_path / "fp16"
    small = dict(block_size=32, batch_size=4, dtype="float16", max_steps=16, eval_interval=8, warmup_steps=2)
    cfg = tiny_run(data_dir, **small)
    pretrain(cfg, run, quiet=True)
    losses = [r["loss"] for r in records(run) if "loss" in r]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    state = torch.load(run / "checkpoints" / "step_000016" / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the GradScaler's state travels with the checkpoint

    more = tiny_run(data_dir, **small)
    resumed = {}

    def spy(step: int, rec: dict) -> None:
        resumed.setdefault("loss", rec["loss"])

    pretrain(more, run, resume=True, quiet=True, callbacks=[spy])  # nothing left to do, but it must load
    assert not resumed  # already at max_steps: no step ran, and loading the scaler state did not fail


def _flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_is_the_run_s_choice_and_does_not_leak(tmp_path, data_dir, tf32, monkeypatch):
    monkeypatch.setattr("llmkit.train.loop.peak_flops", lambda device, dtype: 1e12)  # not what is tested here
    before = _flags()
    seen: list[tuple[bool, bool]] = []
    try:
        caller = (not tf32, not tf32)  # the caller's setting is the opposite of the run's
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = caller
        cfg = tiny_run(data_dir, dtype="float32", tf32=tf32, max_steps=3, eval_interval=0)
        pretrain(cfg, tmp_path / "run", quiet=True, callbacks=[lambda step, rec: seen.append(_flags())])
        assert seen and all(f == (tf32, tf32) for f in seen)  # float32 means fp32 unless TF32 is asked for
        assert _flags() == caller  # put back as the caller had it
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_float32_on_cuda_is_true_fp32(tmp_path, data_dir):
    seen = []
    cfg = tiny_run(data_dir, dtype="float32", device="cuda", max_steps=3, eval_interval=0)
    pretrain(cfg, tmp_path / "run", quiet=True, callbacks=[lambda step, rec: seen.append(_flags())])
    assert seen and all(f == (False, False) for f in seen)


# --------------------------------------------------------------------------------------------- LoRA defaults


@pytest.mark.parametrize("spelling", ["yes", "on", "1", "true", "True", True])
def test_every_spelling_of_yes_gives_the_lora_defaults(spelling):
    cfg = finetune_config(None, {"finetune.base": "m", "data.path": "movie-reviews", "finetune.lora": spelling})
    assert cfg.finetune.lora is True and cfg.train.lr == 1e-3


def test_every_spelling_of_no_gives_the_full_fine_tune_defaults():
    for spelling in ("no", "off", "0", "false", False):
        cfg = finetune_config(None, {"finetune.base": "m", "data.path": "movie-reviews", "finetune.lora": spelling})
        assert cfg.finetune.lora is False and cfg.train.lr == 1e-4
    with pytest.raises(ConfigError, match="finetune.lora"):
        finetune_config(None, {"finetune.base": "m", "data.path": "movie-reviews", "finetune.lora": "maybe"})


# --------------------------------------------------------------------------------------------- TensorBoard


class Crash(Exception):
    pass


def _scalars(log_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.mark.slow
def test_tensorboard_mirrors_metrics_jsonl_and_resume_appends(tmp_path, data_dir):
    run = tmp_path / "run"
    cfg = tiny_run(data_dir, report_to="tensorboard", max_steps=16, eval_interval=8)

    def crash(step: int, rec: dict) -> None:
        if step == 11:  # past the step-8 checkpoint: steps 9-11 are logged, then lost
            raise Crash

    with pytest.raises(Crash):
        pretrain(cfg, run, quiet=True, callbacks=[crash])
    pretrain(cfg, run, resume=True, quiet=True)

    recs = records(run)
    train = {r["step"]: r["loss"] for r in recs if "loss" in r}
    val = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    assert sorted(train) == list(range(1, 17)) and sorted(val) == [8, 16]
    tb_train = _scalars(run / "tensorboard", "train/loss")
    assert sorted(tb_train) == sorted(train)  # the crashed run's steps 9-11 were purged, not doubled
    assert all(tb_train[s] == pytest.approx(train[s], rel=1e-6) for s in train)
    tb_val = _scalars(run / "tensorboard", "val/loss")
    assert all(tb_val[s] == pytest.approx(val[s], rel=1e-6) for s in val)
    assert set(_scalars(run / "tensorboard", "train/mfu")) == set(train)
    peaks = [r for r in recs if "peak_tflops" in r]  # MFU's denominator, recorded at each (re)start
    assert [r["step"] for r in peaks] == [0, 8] and all(r["peak_tflops"] > 0 for r in peaks)


def test_report_to_is_checked(tmp_path, data_dir, monkeypatch):
    with pytest.raises(ConfigError, match="train.report_to.*none or tensorboard"):
        tiny_run(data_dir, report_to="wandb")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ConfigError, match=r"pip install 'llmkit\[tensorboard\]'"):
        pretrain(tiny_run(data_dir, report_to="tensorboard", max_steps=2), tmp_path / "run", quiet=True)
