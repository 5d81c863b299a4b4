"""The one training loop. Every objective (causal LM now; masked LM, classification, distillation later) and
every caller (pretrain, finetune, federated clients) runs through `train`.

It does: AdamW (fused where available, no decay on norms/biases/embeddings), warmup + cosine schedule, gradient
accumulation, clipping, bf16 autocast, optional torch.compile, DDP under torchrun, periodic evaluation with early
stopping, atomic resumable checkpoints, metrics.jsonl, a loss-curve PNG and a progress bar with tokens/s and MFU.
"""

from __future__ import annotations

import contextlib
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
from llmkit.files import atomic_write_text
from llmkit.model.weights import load_into, save_weights
from llmkit.plots import plot_metrics
from llmkit.runtime import autocast, peak_flops, resolve_device, resolve_dtype
from llmkit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from llmkit.train.distributed import setup_distributed
from llmkit.train.objectives import Objective
from llmkit.train.optim import lr_at, make_optimizer

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
) -> TrainResult:
    """Train `model` in place. `batches` must have state_dict()/load_state_dict() for exact resumption.

    `val_metrics` turns the mean validation loss into extra figures (perplexity, bits per byte).
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    ddp = setup_distributed(device)
    if device.type == "cuda" and ddp.world > 1:
        device = torch.device("cuda", ddp.local_rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    metrics_path = run_dir / "metrics.jsonl"
    step, best_val, bad_evals, elapsed = 0, None, 0, 0.0

    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} to resume from")
        weights, state = load_checkpoint(ckpt)
        load_into(model, weights, ckpt / "model.safetensors")
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["data"])  # type: ignore[attr-defined]
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        step, best_val, bad_evals = state["step"], state["best_val"], state["bad_evals"]
        elapsed = state.get("elapsed", 0.0)
        _truncate_metrics(metrics_path, step)
    elif ddp.main and metrics_path.exists():
        metrics_path.unlink()

    net: nn.Module = model
    if cfg.compile:
        net = torch.compile(model)
    if ddp.world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[ddp.local_rank] if device.type == "cuda" else None)
    peak = peak_flops(device, dtype) if flops_per_token else 0.0

    def state_dict() -> dict[str, Any]:
        return {"step": step, "optimizer": optimizer.state_dict(), "data": batches.state_dict(),  # type: ignore
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                "best_val": best_val, "bad_evals": bad_evals, "elapsed": elapsed}

    def log(record: dict[str, Any]) -> None:
        if ddp.main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def run_eval() -> dict[str, float]:
        nonlocal best_val, bad_evals
        res = evaluate(model, objective, val_batches, device, dtype)
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
            if ddp.main:
                save_weights(model, run_dir / "model.safetensors")
        else:
            bad_evals += 1
        return val

    model.train()
    bar = tqdm(total=cfg.max_steps, initial=step, disable=quiet or not ddp.main, dynamic_ncols=True, unit="step")
    stopped_early, last = False, {}
    window_t, window_tokens = time.perf_counter(), 0
    start_wall = time.perf_counter() - elapsed
    while step < cfg.max_steps:
        time_used = (time.perf_counter() - start_wall) / (cfg.max_minutes * 60) if cfg.max_minutes > 0 else 0.0
        lr = lr_at(step, cfg, time_used)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        extra: dict[str, Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = to_device(next(batches), device)
            sync = ddp.world == 1 or micro == cfg.grad_accum - 1
            with (contextlib.nullcontext() if sync else net.no_sync()), autocast(device, dtype):
                loss, metrics = objective(net, batch)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0.0) + v.detach() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_tokens += tokens_per_batch * cfg.grad_accum * ddp.world
        elapsed = time.perf_counter() - start_wall
        out_of_time = cfg.max_minutes > 0 and elapsed >= cfg.max_minutes * 60
        is_last = step == cfg.max_steps or out_of_time

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
            last.update(val)
            bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in val.items()))
            if cfg.early_stop_patience and bad_evals >= cfg.early_stop_patience:
                stopped_early = True
                bar.write(f"early stop: {cfg.select_metric} has not improved for {bad_evals} evaluations")
        save_now = evaluate_now or stopped_early or (cfg.save_interval and step % cfg.save_interval == 0)
        if save_now and ddp.main:
            save_checkpoint(run_dir, step, model, state_dict())
            plot_metrics(metrics_path, run_dir / "loss.png")
        if stopped_early or out_of_time:
            break
        if evaluate_now or save_now:  # keep evaluation and disk time out of the tokens/s figure
            window_t, window_tokens = time.perf_counter(), 0
    bar.close()
    if not val_batches and ddp.main:
        save_weights(model, run_dir / "model.safetensors")
    return TrainResult(step=step, best_val=best_val, last=last, stopped_early=stopped_early)


def _truncate_metrics(path: Path, step: int) -> None:
    """A resumed run rewrites what came after its checkpoint: drop those lines so no step appears twice."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
