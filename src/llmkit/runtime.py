"""Where and in what precision tensors live: device and dtype choice, autocast, the measured matmul peak.

Shared by training, inference and the benchmarks, so it sits below both and imports neither.
"""

from __future__ import annotations

import contextlib
import time

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


_PEAK: dict[tuple[str, torch.dtype], float] = {}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Achievable matmul FLOP/s on this device and dtype, measured once (MFU's denominator)."""
    key = (device.type, dtype)
    if key not in _PEAK:
        n = 4096 if device.type == "cuda" else 1024
        a = torch.full((n, n), 0.5, device=device, dtype=dtype)  # not randn: the global RNG must stay untouched
        b = torch.full((n, n), 0.25, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        reps = 20 if device.type == "cuda" else 5
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        _PEAK[key] = 2 * n**3 * reps / (time.perf_counter() - t0)
    return _PEAK[key]

