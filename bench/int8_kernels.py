"""Which int8 matmul can decode fast on this CPU, and at what accuracy cost? Batch-1 kernel timings (issue 8).

`bench/quant_split.py` shows that on SmolLM2 only a finer int8 grid (one scale per 32 weights, llama.cpp's Q8_0)
computed with float32 activations clears 97 % same top token; rounding the activations to bfloat16 (what the packed
CPU kernels take) costs it again. This times, for SmolLM2-135M's matrix shapes at batch 1 (decode), every way
PyTorch 2.13 offers to multiply by int8 weights on a CPU, beside the float matmuls they must beat:

- `fp32 dense`, `bf16 dense`: F.linear on float32 / bfloat16 weights (llmkit's base and bf16 rows);
- `int8pack bf16` / `int8pack fp32`: `torch._weight_int8pack_mm` (one scale per row) with bfloat16 / float32
  activations (llmkit's int8 format uses the first);
- `int8 g32 compiled`: int8 codes with one float32 scale per 32 weights, dequantised and reduced inside one
  `torch.compile`d (Inductor) function with float32 activations: the accurate format, in the only fused form
  PyTorch can generate for it without a hand-written kernel.

    python bench/int8_kernels.py [--iters 50]

Prints a machine line, then one JSON line per shape with microseconds per call for each kernel.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from train_throughput import machine

GROUP = 32
# SmolLM2-135M: q/o (576 x 576), k/v (192 x 576), gate/up (1536 x 576), down (576 x 1536), the tied head (49152 x 576)
SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576))


@torch.compile(dynamic=False)
def int8_group_gemv(x: Tensor, q: Tensor, s: Tensor) -> Tensor:
    """x (1, K) float32, q (N, K) int8, s (N, K / GROUP) float32 -> (1, N): dequantise and reduce in one kernel."""
    n, k = q.shape
    w = q.float().view(n, k // GROUP, GROUP) * s[:, :, None]  # (N, G, GROUP)
    return (w.view(n, k) * x).sum(-1)[None]  # (1, N)


def per_call_us(iters: int, fn: Callable[..., Tensor], *args: Tensor) -> float:
    for _ in range(3):  # warm-up (and, for the compiled kernel, its compilation)
        fn(*args)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(*args)
    return (time.perf_counter() - t0) / iters * 1e6


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50, help="timed calls per kernel and shape")
    args = ap.parse_args()
    print(json.dumps({**machine(), "bench": "int8_kernels"}), flush=True)
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)  # (N, K)
        s_group = torch.rand(n, k // GROUP, generator=g) * 1e-2  # (N, K / GROUP)
        s_row = s_group[:, 0].contiguous()  # (N,)
        w32 = (q.float().view(n, k // GROUP, GROUP) * s_group[:, :, None]).view(n, k)  # (N, K)
        w16 = w32.bfloat16()
        x = torch.randn(1, k, generator=g)  # (1, K)
        x16 = x.bfloat16()
        exact = x.double() @ w32.double().T  # (1, N)
        err = float((int8_group_gemv(x, q, s_group) - exact).abs().max() / exact.abs().max())
        n_it = args.iters
        us = {"fp32 dense": per_call_us(n_it, F.linear, x, w32),
              "bf16 dense": per_call_us(n_it, F.linear, x16, w16),
              "int8pack bf16": per_call_us(n_it, torch._weight_int8pack_mm, x16, q, s_row.bfloat16()),
              "int8pack fp32": per_call_us(n_it, torch._weight_int8pack_mm, x, q, s_row),
              "int8 g32 compiled": per_call_us(n_it, int8_group_gemv, x, q, s_group)}
        print(json.dumps({"shape": [n, k], "us": {name: round(t, 1) for name, t in us.items()},
                          "int8_g32_compiled_rel_err": err}), flush=True)


if __name__ == "__main__":
    main()
