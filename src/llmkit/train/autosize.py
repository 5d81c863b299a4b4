"""`model.preset: auto`: the model shape a time budget makes compute-optimal on this machine.

"I have N minutes: what is the best model I can get?" Under a fixed budget a bigger model learns more per token
but sees fewer tokens; the best trade-off puts a roughly fixed number of training tokens on each parameter
(Hoffmann et al. 2022, "Chinchilla": D ≈ 20·N). How many tokens a shape sees in N minutes depends on the machine,
so it is measured, not guessed: a few real training steps (the model, the objective and the optimiser the loop
uses; random tokens, the run's batch and context) time each candidate shape of a ladder, and the rule

    choose the shape whose budget tokens (tokens/s x budget seconds x processes) per parameter are nearest k
    (in log): the largest that reaches k x parameters, or the next one up if it falls short by a smaller factor

picks one (parameters as the run prints them: tied embeddings once, learned positions left out). Fewer tokens
per parameter than k means the model is too big for its budget; more means it could afford to be bigger. The
throughputs are measured from the smallest shape up, the others predicted from the nearest measured one's
FLOP/s (`flops_per_token`), so only the shapes around the answer are timed: a few seconds on a laptop CPU.

k: `TOKENS_PER_PARAM` = 3, fitted by bench/sweep.py (`--report`) on this project's data: Shakespeare with the demo's
4,096-token BPE, context 256, configs/demo.yaml's recipe, on a 2-core AVX2 CPU. Where each budget's curve bottoms
out, the budget tokens per parameter were 1.5 at 2 minutes, >= 3.1 at 5 and >= 6.4 at 10 (the best shape there was
the smallest swept, 2x128, level with 3x128); 3 is about their geometric mean. That k rises with the budget is the
corpus: 1.5 M training tokens repeat after a pass, so past a point more minutes buy repeated tokens rather than a
bigger model. Near the optimum the curves are flat (a rung either side costs 0-2 %), which is what a single k
relies on. Chinchilla's 20 (70 M-16 B parameters, non-repeated web text) would pick shapes far too small here.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from llmkit.config import ModelConfig, RunConfig, TrainConfig
from llmkit.errors import ConfigError
from llmkit.runtime import autocast, resolve_device, resolve_dtype
from llmkit.train.budget import PROBE_STEPS, steady_step_time
from llmkit.train.distributed import broadcast_from_main, setup_distributed

TOKENS_PER_PARAM = 3.0  # k of the rule: budget tokens per parameter; fitted by bench/sweep.py, see the module docstring
MAX_PROBES = 8  # candidates timed at most
RECORD = "autosize.json"  # in the run folder: the rule, every measured throughput and the choice
RULE = ("the shape whose budget tokens (tokens/s x budget seconds) per parameter are nearest tokens_per_param, "
        "in log: the largest that reaches it or the next one up")

# Candidate shapes, LAYERSxWIDTH, smallest first: from a 2-core CPU's 2-minute budget to a GPU's hours; about
# 1.5-2.5 x the parameters from one to the next. Heads and MLP widths follow one rule (parse_shape, shape_config).
LADDER_NAMES = ("1x64 2x64 2x96 2x128 3x128 4x128 4x160 4x192 6x192 6x256 6x384 8x512 10x640 12x768 16x1024 "
                "24x1024 24x1536").split()


def parse_shape(text: str) -> tuple[int, int, int]:
    """`6x384` (layers x width) -> (n_layer, n_embd, n_head) with the ladder's head width."""
    try:
        n_layer, n_embd = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"shape {text!r}: expected LAYERSxWIDTH, e.g. 6x384") from None
    if n_layer < 1 or n_embd < 32 or n_embd % 32:
        raise ConfigError(f"shape {text!r}: needs at least 1 layer and a width that is a multiple of 32")
    return n_layer, n_embd, n_embd // (32 if n_embd <= 256 else 64)


LADDER: tuple[tuple[int, int, int], ...] = tuple(parse_shape(name) for name in LADDER_NAMES)


def shape_config(base: ModelConfig, n_layer: int, n_embd: int, n_head: int) -> ModelConfig:
    """`base` (flavour, context, vocabulary) with this shape: one query head per key/value head, the MLP 4 x wide
    (gpt2) or 8/3 x rounded up to a multiple of 32 (llama; the `tiny` preset's 1024 at width 384)."""
    hidden = 4 * n_embd if base.arch == "gpt2" else 32 * math.ceil(8 * n_embd / 3 / 32)
    return replace(base, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_kv_head=n_head, head_dim=None,
                   intermediate_size=hidden, autosize=False)


def check(cfg: RunConfig) -> None:
    """Bad input for `auto`, before anything is measured or written."""
    if cfg.train.max_minutes <= 0:
        raise ConfigError("model.preset auto: needs train.max_minutes, the time budget the shape is chosen for "
                          "(e.g. --train.max_minutes 10)")
    if cfg.model.arch not in ("gpt2", "llama"):
        raise ConfigError(f"model.preset auto: sizes decoders only (model.arch gpt2 or llama), got "
                          f"{cfg.model.arch!r}")
    if cfg.train.objective != "causal_lm":
        raise ConfigError(f"model.preset auto: sizes causal_lm pretraining only, got train.objective "
                          f"{cfg.train.objective!r}")


# ------------------------------------------------------------------------------------------------- the rule


@dataclass
class Choice:
    """What `auto` decided and from which measurements (autosize.json)."""

    index: int  # into the candidates
    budget_s: float
    tokens_per_param: float  # k
    names: list[str]
    params: list[int]
    measured: dict[int, float] = field(default_factory=dict)  # candidate index -> tokens/s (all processes)

    def budget_tokens(self, i: int) -> float:
        return self.measured[i] * self.budget_s

    def ratio(self, i: int) -> float:
        """Budget tokens per parameter of candidate i."""
        return self.budget_tokens(i) / self.params[i]

    def reason(self) -> str:
        i, k = self.index, self.tokens_per_param
        n, d = self.params[i], self.budget_tokens(i)
        why = (f"its {d / 1e6:.3g} M budget tokens ({self.measured[i]:,.0f} tokens/s x {self.budget_s:g} s) are "
               f"{d / n:.2f} per parameter, the nearest to k = {k:g}")
        if d < k * n and i == 0:
            why = (f"even the smallest candidate gets only {d / n:.2g} tokens per parameter ({d / 1e6:.3g} M tokens) "
                   f"of the {k:g} the rule asks for")
        for j in (i - 1, i + 1):
            if j in self.measured and self.measured[j] > 0:
                why += f"; {self.names[j]} ({self.params[j] / 1e6:.3g} M) would get {self.ratio(j):.2f}"
        return f"{self.names[i]} ({n / 1e6:.3g} M parameters): {why}"

    def record(self, cfg: ModelConfig, device: str, dtype: str, world: int, batch_tokens: int) -> dict[str, Any]:
        return {"rule": RULE,
                "tokens_per_param": self.tokens_per_param, "budget_s": self.budget_s, "device": device,
                "dtype": dtype, "processes": world, "batch_tokens_per_step": batch_tokens,
                "chosen": {"shape": self.names[self.index], "params": self.params[self.index],
                           "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                           "intermediate_size": cfg.intermediate_size, "block_size": cfg.block_size,
                           "vocab_size": cfg.vocab_size},
                "measured": [{"shape": self.names[i], "params": self.params[i], "tokens_per_s": round(t, 1),
                              "budget_tokens_per_param": round(t * self.budget_s / self.params[i], 2)}
                             for i, t in sorted(self.measured.items())],
                "reason": self.reason()}


def choose(params: list[int], flops: list[float], measure: Callable[[int], float], budget_s: float,
           tokens_per_param: float = TOKENS_PER_PARAM, max_probes: int = MAX_PROBES,
           names: list[str] | None = None) -> Choice:
    """The candidate (sorted by size) whose measure(i) x budget_s / params[i] is nearest k in log: the largest
    that reaches k, or the one above it when that one falls short of k by a smaller factor. (k is fitted where the
    sweep's curve bottoms out, between rungs; always rounding down would give away up to a rung's worth.)

    `measure(i)` is candidate i's training tokens/s (0 when it does not fit in memory). The smallest candidate is
    measured first; an unmeasured one is predicted from the nearest measured candidate's FLOP/s
    (`flops[i]` = training FLOPs per token), the predicted answer and the one above it are measured, until both
    are known (or `max_probes` are spent). Only measured candidates are chosen."""
    c = Choice(0, budget_s, tokens_per_param, names or [str(n) for n in params], list(params))

    def tps(j: int) -> float:
        if j in c.measured:
            return c.measured[j]
        near = min(c.measured, key=lambda i: (abs(i - j), -i))
        return c.measured[near] * flops[near] / flops[j]

    def fits(j: int) -> bool:
        return tps(j) * budget_s >= tokens_per_param * params[j]

    c.measured[0] = measure(0)
    while len(c.measured) < max_probes:
        best = max((j for j in range(len(params)) if fits(j)), default=0)
        todo = [j for j in (best, best + 1) if j < len(params) and j not in c.measured]
        if not todo:
            break
        c.measured[todo[0]] = measure(todo[0])
    c.index = max((j for j in c.measured if fits(j)), default=0)
    up = c.index + 1
    if fits(c.index) and c.measured.get(up, 0) > 0 and (
            math.log(tokens_per_param / c.ratio(up)) < math.log(c.ratio(c.index) / tokens_per_param)):
        c.index = up  # the rung above misses k by less (in log) than the largest that reaches it exceeds it
    return c


# ------------------------------------------------------------------------------------------ the measurement


def measure_throughput(model_cfg: ModelConfig, train_cfg: TrainConfig, batch_size: int, device: torch.device,
                       dtype: torch.dtype, steps: int = PROBE_STEPS) -> float:
    """Training tokens/s of one shape: a warm-up step, then `steps` timed steps of the model, objective and
    optimiser the loop uses, on random tokens (a step's cost does not depend on which tokens), timed as the time
    budget times a run (budget.steady_step_time: the first steps after the warm-up still run slower). 0 if it
    runs out of memory."""
    from llmkit.model import build_model
    from llmkit.train.objectives import get_objective
    from llmkit.train.optim import make_optimizer

    T = model_cfg.block_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(model_cfg.vocab_size, (batch_size, T + 1), generator=gen).to(device)  # (B, T+1)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}  # (B, T) each
    objective = get_objective("causal_lm")
    try:
        model = build_model(model_cfg).to(device)
        model.train()
        optimizer = make_optimizer(model, train_cfg, device)
        times = []
        for _ in range(steps + 1):
            _sync(device)
            t0 = time.perf_counter()
            with autocast(device, dtype):
                loss, _ = objective(model, batch)
            loss.backward()
            if train_cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        return 0.0
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return batch_size * T / steady_step_time(times[1:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def candidates(base: ModelConfig) -> tuple[list[ModelConfig], list[int], list[float]]:
    """The ladder in `base`'s flavour, context and vocabulary: configs, parameters, training FLOPs per token
    (counted on meta tensors: nothing is allocated)."""
    from llmkit.model import build_model

    cfgs, params, flops = [], [], []
    for n_layer, n_embd, n_head in LADDER:
        cfg = shape_config(base, n_layer, n_embd, n_head)
        with torch.device("meta"):
            model = build_model(cfg)
        cfgs.append(cfg)
        params.append(model.num_params())
        flops.append(model.flops_per_token(cfg.block_size))
    return cfgs, params, flops


def resolve(cfg: RunConfig, run_dir: Path, resume: bool, quiet: bool = False) -> dict[str, Any]:
    """Replace cfg.model (preset auto, vocabulary known) by the chosen shape; return the record for RECORD.

    A resumed run takes the shape its folder recorded (measuring again could pick another and the checkpoint
    would no longer fit). Under torchrun rank 0 measures and every rank takes its choice."""
    check(cfg)
    cfgs, params, flops = candidates(cfg.model)
    names = list(LADDER_NAMES)
    if resume:
        recorded = run_dir / RECORD
        if not recorded.is_file():
            raise ConfigError(f"model.preset auto with --resume: {recorded} is missing, so the shape this run "
                              "chose is unknown (resume with the run's own config.yaml instead)")
        record = json.loads(recorded.read_text(encoding="utf-8"))
        chosen = record["chosen"]["shape"]
        if chosen not in names:
            raise ConfigError(f"{recorded}: chosen shape {chosen!r} is not one this version of llmkit offers")
        cfg.model = cfgs[names.index(chosen)]
        return record
    device = resolve_device(cfg.train.device)
    d = setup_distributed(device)
    if device.type == "cuda" and d.world > 1:
        device = torch.device("cuda", d.local_rank)
    dtype = resolve_dtype(cfg.train.dtype, device)
    budget_s = cfg.train.max_minutes * 60

    def measure(i: int) -> float:  # tokens/s of all processes: each one trains on its own batches
        tps = measure_throughput(cfgs[i], cfg.train, cfg.data.batch_size, device, dtype) * d.world
        if not quiet:
            print(f"  auto: {names[i]:>8} {params[i] / 1e6:8.3f} M parameters  {tps:12,.0f} tokens/s", file=sys.stderr)
        return tps

    t0 = time.perf_counter()
    choice = choose(params, flops, measure, budget_s, names=names) if d.main else None
    index = int(broadcast_from_main([float(choice.index if choice else 0)], d, device)[0])
    cfg.model = cfgs[index]
    if choice is None:
        return {}
    record = choice.record(cfg.model, str(device), str(dtype).removeprefix("torch."), d.world,
                           cfg.data.batch_size * cfg.model.block_size)
    record["measure_s"] = round(time.perf_counter() - t0, 2)
    if not quiet:
        print(f"model.preset auto, {cfg.train.max_minutes:g} min on {device} ({record['dtype']}): chose "
              f"{choice.reason()} [rule: budget tokens per parameter nearest {choice.tokens_per_param:g}; "
              f"{len(choice.measured)} shapes timed in {record['measure_s']:.1f} s]",
              file=sys.stderr)
    return record
