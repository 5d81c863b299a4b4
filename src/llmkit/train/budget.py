"""A time budget (`train.max_minutes`) decided once: a few timed steps -> a fixed number of steps, on every rank.

A schedule that follows the clock makes every run different: a resumed run no longer repeats the interrupted one,
and under torchrun each rank reads its own clock, so ranks get different learning rates (silently different
models) and may stop at different steps (the others then hang in the next all-reduce). So the clock is read once.
After the first step of a process (compilation, allocator warm-up: excluded) rank 0 times probe steps, one
evaluation and one checkpoint, fits the most steps whose training, evaluations and checkpoints fit the budget
(never more than `train.max_steps`) and broadcasts that number. The probe runs while the learning-rate warm-up
lasts (there the rate does not depend on the plan), from `PROBE_STEPS` up to `MAX_PROBE_STEPS` steps or
`PROBE_SHARE` of the budget, and the step time is the median of its last third: on a 2-core CPU the first ~10
steps ran up to 40 % slower than the rest, and a plan from five probes left 29 % of the demo's budget unused.
From then on the schedule, the progress bar and the end of the run depend on steps only, and the plan travels in
every checkpoint: a resumed run finishes the same plan, on any number of processes.

Should real time still overrun the budget badly (a slower machine after a resume, a busy neighbour), rank 0
decides at a log step to stop and broadcasts it, so every rank stops at the same step.
"""

from __future__ import annotations

import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llmkit.config import TrainConfig
from llmkit.train.distributed import Dist, broadcast_from_main

PROBE_STEPS = 5  # the fewest timed steps after the first one
MAX_PROBE_STEPS = 40  # the most, and only while the learning rate still warms up
PROBE_SHARE = 0.05  # probing stops once its steps took this share of the budget
STEADY_PROBES = 3  # the fewest last probes whose median is the step time: the first ones still warm up
OVERRUN = 1.1  # stop early once real time passes the budget by this factor


def steady_step_time(durations: list[float]) -> float:
    """A step's time from probe timings: the median of their last third, at least STEADY_PROBES (the first ones
    still warm up). autosize times candidate shapes the same way."""
    return statistics.median(durations[-max(STEADY_PROBES, len(durations) // 3):])


def probe_limit(cfg: TrainConfig) -> int:
    """How many steps the probe may time: between PROBE_STEPS and MAX_PROBE_STEPS, and while the warm-up lasts.
    The first step and n probes run with rates lr_at(0..n), which do not depend on the plan while n < warmup."""
    return max(PROBE_STEPS, min(MAX_PROBE_STEPS, cfg.warmup_steps - 1))


@dataclass
class Measured:
    spent_s: float  # training time of the run so far, the probes included
    sec_per_step: float
    eval_s: float  # one evaluation
    save_s: float  # one checkpoint (gather + write)


@dataclass
class Plan:
    minutes: float
    sec_per_step: float
    eval_s: float
    save_s: float
    steps: int
    decided_at: int

    def describe(self, max_steps: int) -> str:
        capped = f" (train.max_steps {max_steps})" if self.steps == max_steps else ""
        return (f"time budget {self.minutes:g} min: measured {self.sec_per_step:.3g} s/step, evaluation "
                f"{self.eval_s:.3g} s, checkpoint {self.save_s:.3g} s -> {self.steps} steps{capped}")

    def record(self) -> dict[str, Any]:
        """The metrics.jsonl line of the decision."""
        return {"step": self.decided_at, "budget_minutes": self.minutes, "sec_per_step": self.sec_per_step,
                "eval_s": self.eval_s, "save_s": self.save_s, "planned_steps": self.steps}


def fit_steps(budget_s: float, m: Measured, done: int, cfg: TrainConfig) -> int:
    """The most steps (from `done` up to cfg.max_steps) whose remaining training fits `budget_s`.

    Counts what the loop will do: a step each, an evaluation at every eval_interval and at the end (charged with
    a checkpoint-sized write too, since an improving evaluation saves the best weights), a checkpoint at every
    evaluation, every save_interval and at the end."""

    def multiples(n: int, hi: int) -> int:  # multiples of n in (done, hi]
        return hi // n - done // n if n > 0 else 0

    def cost(total: int) -> float:
        e, s = cfg.eval_interval, cfg.save_interval
        evals = multiples(e, total) + (0 if e > 0 and total % e == 0 else 1)
        both = multiples(math.lcm(e, s), total) if e > 0 and s > 0 else 0
        saves = multiples(e, total) + multiples(s, total) - both
        at_a_save = (e > 0 and total % e == 0) or (s > 0 and total % s == 0)
        saves += 0 if at_a_save else 1
        return (m.spent_s + (total - done) * m.sec_per_step + evals * (m.eval_s + m.save_s)
                + saves * m.save_s)

    lo, hi = done, max(done, cfg.max_steps)
    while lo < hi:  # cost grows with the number of steps: the last one that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget_s else (lo, mid - 1)
    return lo


class Budget:
    """The run's number of steps: cfg.max_steps, or under a time budget the plan rank 0 measured and shared."""

    def __init__(self, cfg: TrainConfig, d: Dist, device: torch.device, saved: dict[str, Any] | None) -> None:
        self.cfg, self.dist, self.device = cfg, d, device
        self.active = cfg.max_minutes > 0
        self.plan = Plan(**saved) if self.active and saved and saved["minutes"] == cfg.max_minutes else None
        self._first_done = False
        self._durations: list[float] = []
        self._t0 = 0.0

    @property
    def steps(self) -> int:
        return min(self.plan.steps, self.cfg.max_steps) if self.plan else self.cfg.max_steps

    def state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps: the plan (plain numbers), so a resume does not measure again."""
        return asdict(self.plan) if self.plan else None

    def _probing(self) -> bool:
        return self.active and self.plan is None

    def step_begins(self) -> None:
        if self._probing():
            _sync(self.device)
            self._t0 = time.perf_counter()

    def step_ends(self) -> bool:
        """Time the step; True once the probe steps are done and the plan is to be decided (on every rank, as
        rank 0 says: the share of the budget is read from its clock)."""
        if not self._probing():
            return False
        _sync(self.device)
        if not self._first_done:  # the first step of a process compiles and warms up: not a typical step
            self._first_done = True
            return False
        self._durations.append(time.perf_counter() - self._t0)
        n = len(self._durations)
        if n < PROBE_STEPS:
            return False
        enough = n >= probe_limit(self.cfg) or sum(self._durations) >= PROBE_SHARE * self.cfg.max_minutes * 60
        return broadcast_from_main([float(enough)], self.dist, self.device)[0] > 0  # rank 0's clock decides

    def measure(self, elapsed_s: float, evaluate: Callable[[], object], save: Callable[[Path], None],
                scratch: Path) -> Measured:
        """Time one evaluation and one checkpoint (to a scratch folder, removed after). Every rank runs them,
        since FSDP gathers collectively; rank 0's figures are the ones that count."""
        t0 = time.perf_counter()
        evaluate()
        t1 = time.perf_counter()
        save(scratch)
        t2 = time.perf_counter()
        if self.dist.main:
            shutil.rmtree(scratch, ignore_errors=True)
        return Measured(spent_s=elapsed_s + time.perf_counter() - t0,
                        sec_per_step=steady_step_time(self._durations), eval_s=t1 - t0,
                        save_s=t2 - t1)

    def decide(self, step: int, elapsed_s: float, evaluate: Callable[[], object], save: Callable[[Path], None],
               scratch: Path) -> Plan:
        m = self.measure(elapsed_s, evaluate, save, scratch)
        steps = fit_steps(self.cfg.max_minutes * 60, m, step, self.cfg)
        n, per_step, eval_s, save_s = broadcast_from_main([steps, m.sec_per_step, m.eval_s, m.save_s],
                                                          self.dist, self.device)
        self.plan = Plan(self.cfg.max_minutes, per_step, eval_s, save_s, int(n), step)
        return self.plan

    def overrun(self, step: int, elapsed_s: float) -> bool:
        """The safety stop, checked at log steps: rank 0 compares its clock with the budget and every rank
        follows its answer (a collective, so every rank must ask at the same steps)."""
        if not self.active or step % self.cfg.log_interval:
            return False
        late = broadcast_from_main([float(elapsed_s > OVERRUN * self.cfg.max_minutes * 60)], self.dist,
                                   self.device)[0] > 0
        if late and self.dist.main:
            print(f"time budget {self.cfg.max_minutes:g} min overrun by more than {OVERRUN - 1:.0%}: "
                  f"stopping at step {step} of {self.steps}", file=sys.stderr)
        return late


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
