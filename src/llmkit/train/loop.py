"""The one training loop. Every objective (causal LM now; masked LM, classification, distillation later) and
every caller (pretrain, finetune, federated clients) runs through `train`.

It does: AdamW (fused where available, no decay on norms/biases/embeddings), warmup + cosine schedule, gradient
accumulation, clipping, bf16 autocast (fp16 with a loss scaler; TF32 only when asked), optional torch.compile, DDP
or FSDP2 under torchrun, a time budget decided once, periodic evaluation with early stopping, atomic resumable
checkpoints, metrics.jsonl (and TensorBoard if asked), a loss-curve PNG and a progress bar with tokens/s and MFU.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from llmkit.config import TrainConfig
from llmkit.errors import ConfigError
from llmkit.model.weights import load_into, save_weights
from llmkit.plots import plot_metrics
from llmkit.runtime import autocast, peak_flops, resolve_device, resolve_dtype, tf32_matmuls
from llmkit.train.budget import Budget
from llmkit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, truncate_metrics
from llmkit.train.distributed import Parallel, mean_over_ranks, setup_distributed
from llmkit.train.objectives import Objective
from llmkit.train.optim import lr_at, make_optimizer
from llmkit.train.report import Reporter

Batch = dict[str, Tensor]
Callback = Callable[[int, dict[str, float]], None]


# ----------------------------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    step: int
    best_val: float | None  # best value of cfg.select_metric
    last: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, objective: Objective, batches: list[Batch], device: torch.device,
             dtype: torch.dtype) -> dict[str, float]:
    """Mean loss (and the objective's metrics) over fixed validation batches."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    for batch in batches:
        with autocast(device, dtype):
            loss, metrics = objective(model, to_device(batch, device))
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    model.train(was_training)
    return {k: v / max(1, len(batches)) for k, v in sums.items()}


def _tf32_for_the_run(fn: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """TF32 as `cfg.tf32` says while train() runs, the caller's setting back afterwards (also on an error)."""
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> TrainResult:
        cfg = kwargs["cfg"] if "cfg" in kwargs else args[2]
        with tf32_matmuls(cfg.tf32):
            return fn(*args, **kwargs)
    return wrapped


@_tf32_for_the_run
def train(
    model: nn.Module,
    objective: Objective,
    cfg: TrainConfig,
    batches: Iterator[Batch],
    val_batches: list[Batch],
    run_dir: str | Path,
    resume: bool = False,
    tokens_per_batch: int = 0,
    flops_per_token: float = 0.0,
    val_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
    callbacks: list[Callback] = (),
    quiet: bool = False,
    wrap_optimizer: Callable[[torch.optim.Optimizer], torch.optim.Optimizer] | None = None,
) -> TrainResult:
    """Train `model` in place. `batches` must have state_dict()/load_state_dict() for exact resumption.

    `val_metrics` turns the mean validation loss into extra figures (perplexity, bits per byte).
    `wrap_optimizer` replaces the optimiser the loop builds by a wrapper around it: per-example DP-SGD (opacus's
    DPOptimizer clips each example's gradient and adds noise in `step`) plugs in here rather than in a second loop.
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    ddp = setup_distributed(device)
    if device.type == "cuda" and ddp.world > 1:
        device = torch.device("cuda", ddp.local_rank)
    par = Parallel(cfg.strategy, ddp, device)
    metrics_path = run_dir / "metrics.jsonl"
    step, best_val, bad_evals, elapsed = 0, None, 0, 0.0
    state: dict[str, Any] = {}
    if resume:  # the full weights go in before the model is placed: FSDP shards what it is given
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} to resume from")
        weights, state = load_checkpoint(ckpt)
        load_into(model, weights, ckpt / "model.safetensors")
    net = par.wrap(model, compile=cfg.compile)  # on the device, compiled, DDP-wrapped or FSDP-sharded
    optimizer = make_optimizer(model, cfg, device)  # after sharding: FSDP replaces the parameters
    if wrap_optimizer is not None:
        optimizer = wrap_optimizer(optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16's range needs loss scaling
    if resume:
        par.load_optimizer_state(model, optimizer, state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        batches.load_state_dict(state["data"])  # type: ignore[attr-defined]
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        step, best_val, bad_evals = state["step"], state["best_val"], state["bad_evals"]
        elapsed = state.get("elapsed", 0.0)
        truncate_metrics(metrics_path, step)
    elif ddp.main and metrics_path.exists():
        metrics_path.unlink()

    budget = Budget(cfg, ddp, device, state.get("budget"))  # the number of steps: max_steps or a time budget's plan
    peak = peak_flops(device, dtype) if flops_per_token else 0.0
    report = Reporter(run_dir, cfg.report_to, ddp.main, step if resume else None)

    def state_dict() -> dict[str, Any]:
        return {"step": step, "optimizer": par.optimizer_state(model, optimizer), "data": batches.state_dict(),  # type: ignore
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                "best_val": best_val, "bad_evals": bad_evals, "elapsed": elapsed, "budget": budget.state(),
                "scaler": scaler.state_dict()}

    def checkpoint(folder: Path) -> None:
        """Every rank takes part (FSDP gathers the full state); rank 0 writes it in the single-process format."""
        full, train_state = par.full_weights(model), state_dict()
        if ddp.main:
            save_checkpoint(folder, step, full, train_state)

    def log(record: dict[str, Any]) -> None:
        if ddp.main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            report.write(record)

    def run_eval() -> dict[str, float]:
        nonlocal best_val, bad_evals
        res = mean_over_ranks(evaluate(model, objective, val_batches, device, dtype), ddp, device)
        val = {f"val_{k}": v for k, v in res.items()}
        if val_metrics:
            val.update(val_metrics(res))
        if cfg.select_metric not in val:
            raise ConfigError(f"train.select_metric: {cfg.select_metric!r} is not measured here "
                              f"(valid: {', '.join(val)})")
        score = val[cfg.select_metric]
        lower_is_better = cfg.select_metric.endswith(("loss", "perplexity", "bits_per_byte"))
        if best_val is None or (score < best_val if lower_is_better else score > best_val):
            best_val, bad_evals = score, 0
            best = par.full_weights(model)  # every rank: FSDP gathers
            if ddp.main:
                save_weights(best, run_dir / "model.safetensors")
        else:
            bad_evals += 1
        return val

    if flops_per_token:  # MFU's denominator and numerator, once per (re)start, so the figure can be checked
        log({"step": step, "peak_tflops": round(peak / 1e12, 6), "flops_per_token": flops_per_token})
    model.train()
    bar = tqdm(total=budget.steps, initial=step, disable=quiet or not ddp.main, dynamic_ncols=True, unit="step")
    stopped_early, last = False, {}
    window_t, window_tokens = time.perf_counter(), 0
    start_wall = time.perf_counter() - elapsed
    while step < budget.steps:
        budget.step_begins()
        lr = lr_at(step, cfg, budget.steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        extra: dict[str, Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = to_device(next(batches), device)
            sync = ddp.world == 1 or micro == cfg.grad_accum - 1
            with par.no_sync(sync), autocast(device, dtype):
                loss, metrics = objective(net, batch)
            scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0.0) + v.detach() / cfg.grad_accum
        scaler.unscale_(optimizer)  # clip the true gradients (a no-op unless fp16)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        scaler.step(optimizer)  # skipped if fp16 overflowed (the scale then halves)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_tokens += tokens_per_batch * cfg.grad_accum * ddp.world
        elapsed = time.perf_counter() - start_wall
        if budget.step_ends():  # the probe steps are timed: fix the number of steps, the same on every rank
            plan = budget.decide(step, elapsed, lambda: evaluate(model, objective, val_batches, device, dtype),
                                 checkpoint, run_dir / ".budget-probe.tmp")
            log(plan.record())
            bar.total = budget.steps
            if ddp.main and not quiet:
                bar.write(plan.describe(cfg.max_steps))
            window_t, window_tokens = time.perf_counter(), 0
        out_of_time = budget.overrun(step, elapsed)  # rank 0 decides for all: no rank is left waiting
        is_last = step == budget.steps or out_of_time

        if step % cfg.log_interval == 0 or is_last or step == 1:
            loss_val = loss_sum.item() / cfg.grad_accum
            if ddp.world > 1:
                t = torch.tensor([loss_val], device=device)
                dist.all_reduce(t)
                loss_val = t.item() / ddp.world
            dt = time.perf_counter() - window_t
            tps = window_tokens / dt if dt > 0 else 0.0
            last = {"step": step, "loss": loss_val, "lr": lr, "tokens_per_s": round(tps, 1),
                    "elapsed_s": round(elapsed, 2), **{k: float(v) for k, v in extra.items()}}
            if grad_norm is not None:
                last["grad_norm"] = float(grad_norm)
            if flops_per_token:
                last["mfu"] = round(flops_per_token * tps / ddp.world / peak, 4)
            log(last)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{last.get('mfu', 0):.1%}",
                            refresh=False)
            window_t, window_tokens = time.perf_counter(), 0
            for cb in callbacks:
                cb(step, last)
        bar.update(1)

        evaluate_now = is_last or (cfg.eval_interval > 0 and step % cfg.eval_interval == 0)
        if evaluate_now and val_batches:
            val = run_eval()
            log({"step": step, **val})
            report.flush()
            last.update(val)
            if ddp.main and not quiet:  # one line per evaluation, not one per rank; stdout stays clean for --json
                bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in val.items()))
            if cfg.early_stop_patience and bad_evals >= cfg.early_stop_patience:
                stopped_early = True
                if ddp.main and not quiet:
                    bar.write(f"early stop: {cfg.select_metric} has not improved for {bad_evals} evaluations")
        save_now = evaluate_now or stopped_early or (cfg.save_interval and step % cfg.save_interval == 0)
        if save_now:
            checkpoint(run_dir)
            if ddp.main:
                plot_metrics(metrics_path, run_dir / "loss.png")
        if stopped_early or out_of_time:
            break
        if evaluate_now or save_now:  # keep evaluation and disk time out of the tokens/s figure
            window_t, window_tokens = time.perf_counter(), 0
    bar.close()
    report.close()
    if not val_batches:
        final = par.full_weights(model)  # every rank: FSDP gathers
        if ddp.main:
            save_weights(final, run_dir / "model.safetensors")
    return TrainResult(step=step, best_val=best_val, last=last, stopped_early=stopped_early)
