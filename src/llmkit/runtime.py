"""Where and in what precision tensors live: device and dtype choice, autocast, the measured matmul peak.

Shared by training, inference and the benchmarks, so it sits below both and imports neither.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from llmkit.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but PyTorch sees no CUDA GPU (use --device cpu or auto)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"unknown device {name!r} (valid: auto, cpu, cuda)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` picks bf16 where it is fast: CUDA GPUs with bf16, and CPUs with native bf16 matmuls (AVX-512 BF16/AMX)."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r} (valid: auto, float32, bfloat16, float16)")
    return table[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TF32 for fp32 matmuls and convolutions (CUDA) exactly while the block runs, then the caller's settings back.

    PyTorch's switches are process-wide: flipping them for good inside `train()` would leak into whatever the
    caller runs next, and having them on makes `dtype: float32` silently TF32 (10-bit mantissa). So a run states
    its choice (`train.tf32`) and gets it for its own duration only; off means true fp32 even when the caller had
    TF32 on. Uses the legacy `allow_tf32` switches, or the newer `fp32_precision` ones when the caller set those
    (PyTorch refuses to read one family after the other was set)."""
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    try:
        before: tuple = (cuda.allow_tf32, cudnn.allow_tf32)
        cuda.allow_tf32 = cudnn.allow_tf32 = enabled
        legacy = True
    except RuntimeError:  # the caller used the fp32_precision API: stay with it
        before = (cuda.fp32_precision, cudnn.conv.fp32_precision)
        cuda.fp32_precision = cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
        legacy = False
    try:
        yield
    finally:
        if legacy:
            cuda.allow_tf32, cudnn.allow_tf32 = before
        else:
            cuda.fp32_precision, cudnn.conv.fp32_precision = before


# Square sizes tried per device: the peak of a GEMM rises with size until the machine is saturated.
PEAK_SIZES = {"cpu": (512, 1024, 2048, 4096), "cuda": (2048, 4096, 8192, 16384)}
_PEAK: dict[tuple, float] = {}


def peak_flops(device: torch.device, dtype: torch.dtype, trial_s: float = 0.2, trials: int = 3) -> float:
    """Achievable dense-matmul FLOP/s on this device in `dtype` (MFU's denominator), measured once per process.

    A CPU has no published peak, and a datasheet peak is not reachable anyway, so MFU here is "fraction of the
    best GEMM throughput this machine showed", measured the way a paper would defend it:
    - square GEMMs of every size in PEAK_SIZES (a single small size under-measures: the kernel is not yet
      saturated, which made a full fp32 step read as 87 % MFU), in the run's dtype (and TF32 state);
    - each size: one warm-up call, calibration (repetitions doubled until a quarter trial is filled), then
      `trials` timed trials of enough repetitions to fill `trial_s` seconds each (~0.8 s per size),
      synchronised on CUDA; the best trial counts (noise only ever slows a trial down);
    - sizes grow while one product of the next size would take under 4 trials' time at the best rate so far
      (so a slow dtype, e.g. bf16 on a CPU without native bf16, costs seconds, not minutes) and stop at an
      out-of-memory error;
    - the peak is the best size's figure: 2 n^3 FLOPs per product.
    Inputs are Gaussian from a private generator (the global RNG stays untouched so seeded runs are unchanged;
    random bits, not constants, because a GPU draws less power, and clocks higher, on constant data).
    """
    key = (device.type, device.index, dtype, torch.get_float32_matmul_precision())
    if key in _PEAK:
        return _PEAK[key]
    gen = torch.Generator(device=device).manual_seed(0)
    best = 0.0
    for n in PEAK_SIZES["cuda" if device.type == "cuda" else "cpu"]:
        if best and 2 * n**3 / best > 4 * trial_s:  # one product of this size would outlast the trials
            break
        try:
            a = torch.randn(n, n, device=device, generator=gen).to(dtype)  # (n, n)
            b = torch.randn(n, n, device=device, generator=gen).to(dtype)  # (n, n)
            c = torch.empty(n, n, device=device, dtype=dtype)  # (n, n), reused: time the product, not malloc
            _timed(a, b, c, 1)  # warm-up: kernel selection, page faults
        except torch.OutOfMemoryError:
            break
        reps = 1  # calibrate as timeit's autorange does: double until a quarter of a trial is filled
        while _timed(a, b, c, reps) < trial_s / 4:
            reps *= 2
        took = min(_timed(a, b, c, reps) for _ in range(2))  # a noise spike must not shorten the trials
        reps = max(1, round(reps * trial_s / took))
        best = max([best] + [2 * n**3 * reps / _timed(a, b, c, reps) for _ in range(trials)])
        del a, b, c
    _PEAK[key] = best
    return best


def _timed(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, reps: int) -> float:
    """Seconds for `reps` products a @ b into `out`, the device drained before and after."""
    cuda = a.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(a.device)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b, out=out)
    if cuda:
        torch.cuda.synchronize(a.device)
    return time.perf_counter() - t0
