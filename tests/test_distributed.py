"""Several processes agree with one. Under torchrun (gloo, CPU) DDP and FSDP2 give the training and validation losses
of one process with the same global batch; their checkpoints resume in one process and the other way round; and a
time budget is one decision (train/budget.py) that every rank and every resume follows.

Tolerance: relative 1e-5 on losses (fp32; ranks only change the order of floating-point sums: measured ~2e-7).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import llmkit
from llmkit.config import RunConfig, TrainConfig, build, load_run_config
from llmkit.model.weights import load_weights
from llmkit.train import loop
from llmkit.train.budget import Budget, Measured, fit_steps
from llmkit.train.optim import lr_at
from llmkit.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]
LLMKIT = [sys.executable, "-m", "llmkit.cli.main"]
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2"]
REL = 1e-5


def run_config(data_dir: Path, batch_size: int = 8, **train) -> dict:
    """test_train.py's tiny run, without dropout and in float32 so that process counts can be compared; one CPU
    thread per process, so that two processes fit two cores."""
    return {
        "model": {"arch": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "block_size": 64,
                  "bias": False, "dropout": 0.0},
        "data": {"path": str(data_dir), "batch_size": batch_size},
        "train": {"max_steps": 8, "warmup_steps": 3, "lr": 3e-3, "eval_interval": 4, "eval_iters": 2,
                  "save_interval": 4, "log_interval": 1, "dtype": "float32", "threads": 1, **train},
    }


def budget_config(data_dir: Path, batch_size: int = 8, **train) -> dict:
    """10 minutes for at most 20 steps; with `fixed_measure(100.0)` the plan after the probe (step 6) is 6 more:
    12 (and however slow this machine is, real time never comes near the budget)."""
    return run_config(data_dir, batch_size, **{"max_steps": 20, "max_minutes": 10.0, **train})


def fixed_measure(sec_per_step: float):
    """A stand-in for Budget.measure: the plan depends on these figures only, not on this machine's speed."""
    return lambda self, elapsed_s, evaluate, save, scratch: Measured(0.0, sec_per_step, 0.0, 0.0)


class TickingClock:
    """A stand-in for the loop's `time` module whose clock advances `tick` seconds per reading: "elapsed" grows with
    the work done, not with how busy this machine is, so a safety stop lands in the same place every run."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


def write(tmp_path: Path, name: str, cfg: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    out: dict[int, float] = {}
    for rec in records(run):
        if key in rec:
            assert rec["step"] not in out, f"{key} of step {rec['step']} logged twice"
            out[rec["step"]] = rec[key]
    return out


def assert_close(got: dict[int, float], want: dict[int, float], rel: float = REL) -> None:
    assert sorted(got) == sorted(want)
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
    assert worst <= rel, f"max relative difference {worst:.2e} > {rel:.0e}: {got} vs {want}"


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def rewind(run_dir: Path, step: int) -> None:
    """Make `step` the run's newest checkpoint, as if the run had been killed just after writing it."""
    root = run_dir / "checkpoints"
    for folder in root.glob("step_*"):
        if int(folder.name.removeprefix("step_")) > step:
            shutil.rmtree(folder)
    (root / "latest").write_text(f"step_{step:06d}\n")


# A torchrun worker that pins the time-budget measurement (optionally differently per rank) and reports its step.
RUNNER = """
import os, sys, time
import torch.distributed as dist
from llmkit.config import load_run_config
from llmkit.train import loop
from llmkit.train.budget import Budget, Measured
from llmkit.train.pretrain import pretrain

rank = int(os.environ.get("RANK", "0"))
per_step = {per_step!r}[rank]
Budget.measure = lambda self, *args: Measured(0.0, per_step, 0.0, 0.0)
if {fake_clocks!r}:  # rank 0's loop clock ticks 0.05 s per reading; rank 1's runs 20x faster than real time
    real, ticks = time.perf_counter, iter(range(1, 1 << 40))
    class Clock:
        perf_counter = staticmethod((lambda: 0.05 * next(ticks)) if rank == 0 else (lambda: 20 * real()))
    loop.time = Clock
result = pretrain(load_run_config(sys.argv[1], {{}}), sys.argv[2], quiet=True)
print(f"rank {{rank}} stopped at step {{result.step}}", flush=True)
if dist.is_initialized():
    dist.destroy_process_group()
"""


def runner(tmp_path: Path, per_step: tuple[float, float], fake_clocks: bool = False) -> str:
    path = tmp_path / "runner.py"
    path.write_text(RUNNER.format(per_step=per_step, fake_clocks=fake_clocks))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    """Runs in this process set one thread (train.threads 1); give the other test modules back what they had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_dir) -> Path:
    """The reference: one process, batch 8, 8 steps, evaluations and checkpoints at steps 4 and 8."""
    out = tmp_path_factory.mktemp("one") / "run"
    pretrain(build(RunConfig, run_config(data_dir)), out, quiet=True)
    return out


# ------------------------------------------------------------------------------------------- DDP and FSDP


@pytest.mark.slow
def test_ddp_equals_one_process_and_its_checkpoint_resumes_in_one_process(tmp_path, data_dir, one_process):
    """2 gloo ranks x batch 4 == 1 process x batch 8 (training and validation losses); the DDP step-4 checkpoint
    then resumes in ONE process with batch 8 and repeats the one-process steps 5-8: same weights, optimizer state
    and position in the global batch order."""
    two = tmp_path / "two"
    cfg = write(tmp_path, "two", run_config(data_dir, batch_size=4))
    run([*TORCHRUN, "-m", "llmkit.cli.main", "pretrain", "--config", cfg, "--out", two, "--quiet"])
    assert_close(losses(two), losses(one_process))
    assert_close(losses(two, "val_loss"), losses(one_process, "val_loss"))

    rewind(two, 4)
    pretrain(load_run_config(two / "config.yaml", {"data.batch_size": 8}), two, resume=True, quiet=True)
    assert (two / "checkpoints" / "step_000008" / "state.pt").exists()  # steps 5-8 ran again, in one process
    assert_close(losses(two), losses(one_process))


@pytest.mark.slow
def test_fsdp_equals_one_process_and_its_checkpoints_are_single_process_ones(tmp_path, data_dir, one_process):
    """FSDP2 on 2 gloo ranks x batch 4 == 1 process x batch 8 (training and validation losses). What it writes
    is what one process writes: the same tensor names (the tied head saved once), an optimizer state in
    `Optimizer.state_dict()` layout read with weights_only=True, a model `llmkit.load` reads, and a checkpoint
    that `--resume` continues in one process."""
    sharded = tmp_path / "fsdp"
    cfg = write(tmp_path, "fsdp", run_config(data_dir, batch_size=4, strategy="fsdp"))
    run([*TORCHRUN, "-m", "llmkit.cli.main", "pretrain", "--config", cfg, "--out", sharded, "--quiet"])
    assert_close(losses(sharded), losses(one_process))
    assert_close(losses(sharded, "val_loss"), losses(one_process, "val_loss"))

    mine, ref = load_weights(sharded / "model.safetensors"), load_weights(one_process / "model.safetensors")
    assert mine.keys() == ref.keys()
    assert all(torch.allclose(mine[k], ref[k], rtol=1e-4, atol=1e-6) for k in ref)
    state = torch.load(sharded / "checkpoints" / "step_000008" / "state.pt", weights_only=True)
    ref_state = torch.load(one_process / "checkpoints" / "step_000008" / "state.pt", weights_only=True)
    assert [g["params"] for g in state["optimizer"]["param_groups"]] == \
           [g["params"] for g in ref_state["optimizer"]["param_groups"]]
    for i, s in ref_state["optimizer"]["state"].items():
        assert torch.allclose(state["optimizer"]["state"][i]["exp_avg"], s["exp_avg"].cpu(), rtol=1e-3, atol=1e-7)
    llm = llmkit.load(sharded, device="cpu")
    assert all(torch.equal(llm.model.state_dict()[k], v) for k, v in mine.items())

    rewind(sharded, 4)
    pretrain(load_run_config(sharded / "config.yaml", {"data.batch_size": 8}), sharded, resume=True, quiet=True)
    assert (sharded / "checkpoints" / "step_000008" / "state.pt").exists()
    assert_close(losses(sharded), losses(one_process))


@pytest.mark.slow
def test_one_process_checkpoint_resumes_sharded(tmp_path, one_process):
    """The other way: the one-process step-4 checkpoint continues under FSDP on 2 ranks, each accumulating 2
    micro-batches of 2 (global 8 again), and repeats the training losses of steps 5-8 (full weights loaded, then
    sharded; the optimizer state spread with set_optimizer_state_dict; gradient sync only on the last micro-batch).
    Validation is not compared: its batches are micro-batches, so 2 x 2 windows here against 8 there."""
    moved = tmp_path / "moved"
    shutil.copytree(one_process, moved)
    rewind(moved, 4)
    run([*TORCHRUN, "-m", "llmkit.cli.main", "pretrain", "--out", moved, "--resume", "--quiet",
         "--train.strategy", "fsdp", "--data.batch_size", "2", "--train.grad_accum", "2"])
    assert (moved / "checkpoints" / "step_000008" / "state.pt").exists()
    assert_close(losses(moved), losses(one_process))


# ------------------------------------------------------------------------------------------- the time budget


@settings(max_examples=150, deadline=None)
@given(done=st.integers(0, 12), extra=st.integers(0, 40), eval_interval=st.integers(0, 7),
       save_interval=st.integers(0, 7), per_step=st.integers(1, 5), eval_s=st.integers(0, 9),
       save_s=st.integers(0, 9), spent=st.integers(0, 30), budget=st.integers(0, 200))
def test_fit_steps_counts_what_the_loop_does(done, extra, eval_interval, save_interval, per_step, eval_s, save_s,
                                             spent, budget):
    """The plan is the longest run whose steps, evaluations (every eval_interval and at the end, each possibly
    saving the best weights) and checkpoints (at evaluations, every save_interval, at the end) fit: checked
    against walking the loop step by step (whole seconds, so that no rounding hides an off-by-one)."""
    cfg = TrainConfig(max_steps=max(1, done + extra), eval_interval=eval_interval, save_interval=save_interval)
    m = Measured(float(spent), float(per_step), float(eval_s), float(save_s))

    def walk(total: int) -> float:
        t = m.spent_s
        for k in range(done + 1, total + 1):
            evaluates = k == total or (eval_interval > 0 and k % eval_interval == 0)
            saves = evaluates or (save_interval > 0 and k % save_interval == 0)
            t += m.sec_per_step + evaluates * (m.eval_s + m.save_s) + saves * m.save_s
        return t

    fits = [n for n in range(done + 1, cfg.max_steps + 1) if walk(n) <= budget]
    assert fit_steps(float(budget), m, done, cfg) == max(fits, default=done)


def test_the_step_time_is_the_steady_probes_not_the_warm_up(tmp_path):
    """Probe steps that are still warming up before the steady ones do not count: the plan's step time is the
    median of the probe's last third (at least STEADY_PROBES), so the budget buys the steps the run will make."""
    from llmkit.train import budget as budget_mod
    from llmkit.train.distributed import Dist

    b = Budget(TrainConfig(max_minutes=1.0), Dist(), torch.device("cpu"), None)
    b._durations = [2.0, 2.0, 1.0, 1.1, 0.9]
    assert budget_mod.STEADY_PROBES == 3
    m = b.measure(0.0, lambda: None, lambda folder: folder.mkdir(), tmp_path / "probe")
    assert m.sec_per_step == 1.0
    assert not (tmp_path / "probe").exists()  # the scratch checkpoint is removed
    # 30 probes, the first 12 slow (a 2-core CPU's warm-up): the last 10 decide
    assert budget_mod.steady_step_time([1.4] * 12 + [1.0] * 18) == 1.0
    assert budget_mod.steady_step_time([1.0] * 15 + [1.4] * 15) == 1.4  # the last third, not all of it


def probes_until_decided(monkeypatch, sec_per_step: float, **train) -> int:
    """How many timed steps a Budget takes before it decides, on a clock that ticks `sec_per_step` per step."""
    from llmkit.train import budget as budget_mod
    from llmkit.train.distributed import Dist

    clock = iter(range(1 << 20))
    monkeypatch.setattr(budget_mod.time, "perf_counter", lambda: sec_per_step * (next(clock) // 2))
    b = Budget(TrainConfig(**train), Dist(), torch.device("cpu"), None)
    for n in range(1000):
        b.step_begins()
        if b.step_ends():
            return n  # the first step is not timed: n probes
    raise AssertionError("the probe never ended")


def test_the_probe_lasts_while_the_warm_up_does(monkeypatch):
    """The probe times more steps when it can (a longer, steadier sample), but only while the learning rate warms
    up (whose rates do not depend on the plan), within PROBE_STEPS..MAX_PROBE_STEPS and PROBE_SHARE of the budget."""
    from llmkit.train import budget as budget_mod

    assert probes_until_decided(monkeypatch, 0.2, max_minutes=6.0, warmup_steps=50) == budget_mod.MAX_PROBE_STEPS
    assert probes_until_decided(monkeypatch, 0.2, max_minutes=6.0, warmup_steps=20) == 19  # lr_at(0..19): warm-up
    assert probes_until_decided(monkeypatch, 0.2, max_minutes=6.0, warmup_steps=3) == budget_mod.PROBE_STEPS
    # 1 s steps in a 2-minute budget: 5 % is 6 s, so 6 probes, not 40
    assert probes_until_decided(monkeypatch, 1.0, max_minutes=2.0, warmup_steps=100) == 6


def test_progress_bar_schedule_and_end_follow_the_plan(tmp_path, data_dir, monkeypatch, capsys):
    """Measured 100 s/step at step 6 with 10 minutes to spend: the run plans 12 of its 20 steps, says so, records
    it, ends at 12 with the progress bar's total at 12, and its learning rates are the schedule of a 12-step run."""
    monkeypatch.setattr(Budget, "measure", fixed_measure(100.0))
    bars = []

    class Bar(loop.tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(loop, "tqdm", Bar)
    cfg = build(RunConfig, budget_config(data_dir, eval_interval=0, save_interval=0))
    result = pretrain(cfg, tmp_path / "run", quiet=False)
    assert result.step == 12
    assert (bars[0].total, bars[0].n) == (12, 12)
    out = capsys.readouterr()
    assert "time budget 10 min: measured 100 s/step, evaluation 0 s, checkpoint 0 s -> 12 steps" in out.out + out.err
    recs = records(tmp_path / "run")
    assert [r for r in recs if "planned_steps" in r] == [
        {"step": 6, "budget_minutes": 10.0, "sec_per_step": 100.0, "eval_s": 0.0, "save_s": 0.0, "planned_steps": 12}]
    lrs = {r["step"]: r["lr"] for r in recs if "lr" in r}
    assert all(lrs[s] == lr_at(s - 1, cfg.train, 12) for s in lrs if s > 6)
    assert lrs[12] < lr_at(11, cfg.train)  # closer to the floor than a 20-step schedule would be


@pytest.mark.slow
def test_budgeted_run_killed_and_resumed_repeats_the_uninterrupted_run(tmp_path, data_dir, monkeypatch):
    """The schedule has no clock: a budgeted run SIGKILLed at step 9 and resumed (the plan read from the step-8
    checkpoint; nothing measured again) logs the losses of the uninterrupted run with the same plan, and ends at
    the same planned step 12."""
    cfg = budget_config(data_dir)
    monkeypatch.setattr(Budget, "measure", fixed_measure(100.0))
    straight = tmp_path / "straight"
    pretrain(build(RunConfig, cfg), straight, quiet=True)

    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        from llmkit.config import RunConfig, build
        from llmkit.train.budget import Budget, Measured
        from llmkit.train.pretrain import pretrain
        Budget.measure = lambda self, *args: Measured(0.0, 100.0, 0.0, 0.0)
        def die(step, _):
            if step == 9:  # past the plan (step 6) and the step-8 checkpoint
                os.kill(os.getpid(), signal.SIGKILL)
        pretrain(build(RunConfig, {cfg!r}), {str(killed)!r}, quiet=True, callbacks=[die])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert max(losses(killed)) == 9
    run([*LLMKIT, "pretrain", "--out", killed, "--resume", "--quiet"])  # no stand-in here: the stored plan rules
    a, b = losses(straight), losses(killed)
    assert sorted(a) == list(range(1, 13))
    assert_close(b, a, rel=1e-6)
    assert sum("planned_steps" in r for r in records(killed)) == 1


@pytest.mark.slow
def test_overrun_stops_the_run_at_a_log_step(tmp_path, data_dir, monkeypatch):
    """A plan that is far too optimistic (0.1 ms/step: all 5,000 steps) is caught by the safety stop: past 1.1 x
    the 6 s budget (on a clock that ticks with the work) the run stops at the next log step, with the final
    evaluation and checkpoint."""
    monkeypatch.setattr(Budget, "measure", fixed_measure(1e-4))
    monkeypatch.setattr(loop, "time", TickingClock(0.1))
    cfg = run_config(data_dir, max_steps=5000, max_minutes=0.1, log_interval=5, eval_interval=0)
    result = pretrain(build(RunConfig, cfg), tmp_path / "run", quiet=True)
    recs = records(tmp_path / "run")
    assert [r["planned_steps"] for r in recs if "planned_steps" in r] == [5000]
    assert result.step < 5000 and result.step % 5 == 0
    last = [r for r in recs if "loss" in r][-1]
    assert last["step"] == result.step and last["elapsed_s"] >= 1.1 * 0.1 * 60
    assert recs[-1]["step"] == result.step and "val_loss" in recs[-1]
    assert (tmp_path / "run" / "checkpoints" / f"step_{result.step:06d}" / "state.pt").exists()


@pytest.mark.slow
def test_ddp_under_a_time_budget_equals_one_process(tmp_path, data_dir, monkeypatch):
    """Under a time budget too, 2 ranks x batch 4 == 1 process x batch 8: the same (pinned) measurement gives both
    the same 12-step plan and schedule, and both ranks end at step 12."""
    monkeypatch.setattr(Budget, "measure", fixed_measure(100.0))
    one = tmp_path / "one"
    pretrain(build(RunConfig, budget_config(data_dir)), one, quiet=True)
    two = tmp_path / "two"
    cfg = write(tmp_path, "two", budget_config(data_dir, batch_size=4))
    proc = run([*TORCHRUN, runner(tmp_path, (100.0, 100.0)), cfg, two])
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert lines == ["rank 0 stopped at step 12", "rank 1 stopped at step 12"]
    assert_close(losses(two), losses(one))
    assert_close(losses(two, "val_loss"), losses(one, "val_loss"))


@pytest.mark.slow
def test_time_budget_on_two_ranks_is_decided_by_rank_0_and_ends_both_together(tmp_path, data_dir):
    """Ranks that would decide differently (rank 1 measures 100,000 times slower and its clock runs 20x fast)
    still stop together: the plan is rank 0's (6,150 steps: too many, 1/1024 s per step claimed) and so is the safety
    stop past 1.1 x the 6 s budget (rank 0's clock ticks with the work). Both ranks exit 0 at the same log step
    instead of one waiting forever in an all-reduce."""
    out = tmp_path / "run"
    cfg = write(tmp_path, "two", run_config(data_dir, batch_size=4, max_steps=100_000, max_minutes=0.1,
                                            log_interval=5, eval_interval=0, save_interval=0))
    proc = run([*TORCHRUN, runner(tmp_path, (2**-10, 100.0), fake_clocks=True), cfg, out], timeout=180)
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    step = int(lines[0].rsplit(" ", 1)[1])
    assert lines == [f"rank 0 stopped at step {step}", f"rank 1 stopped at step {step}"]
    assert [r["planned_steps"] for r in records(out) if "planned_steps" in r] == [6150]
    assert 6 < step < 6150 and step % 5 == 0
    assert max(losses(out)) == step
