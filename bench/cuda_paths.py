"""Prove the CUDA paths on a GPU: llmkit's one attention on SDPA's flash kernel in bf16, torch.compile, bf16 training.

For each check it prints one JSON line; a check that cannot run says why instead of failing the others.

    python bench/cuda_paths.py            (needs a CUDA GPU)

- flash: the decoder's forward and backward run with SDPA restricted to FLASH_ATTENTION (an error if the flash
  kernel cannot take llmkit's shapes/dtype), and its logits equal the math kernel's within bf16 tolerance.
- compile: torch.compile of the decoder gives the eager logits (fp32, 1e-4) and its training step time.
"""

from __future__ import annotations

import json
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmkit.config import ModelConfig
from llmkit.model import build_model


def flash(cfg: ModelConfig) -> dict:
    model = build_model(cfg).cuda().to(torch.bfloat16)
    x = torch.randint(0, cfg.vocab_size, (4, cfg.block_size), device="cuda")
    with sdpa_kernel(SDPBackend.MATH):
        ref = model(x).logits.float()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = model(x).logits
        out.float().square().mean().backward()  # the flash kernel's backward too
    return {"check": "sdpa_flash_bf16", "ok": True, "max_abs_diff_vs_math": float((out.float() - ref).abs().max()),
            "logit_scale": float(ref.abs().max())}


def compiled(cfg: ModelConfig, steps: int = 20) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    x = torch.randint(0, cfg.vocab_size, (8, cfg.block_size), device="cuda")
    eager = model(x).logits
    net = torch.compile(model)
    diff = float((net(x).logits - eager).abs().max())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times = {}
    for name, m in (("eager", model), ("compiled", net)):
        for i in range(steps + 3):
            if i == 3:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = m(x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times[name] = (time.perf_counter() - t0) / steps
    return {"check": "torch_compile", "ok": diff < 1e-3, "max_abs_diff_fp32": diff,
            "step_ms_bf16": {k: round(v * 1e3, 2) for k, v in times.items()},
            "speedup": round(times["eager"] / times["compiled"], 3)}


def main() -> None:
    if not torch.cuda.is_available():
        print(json.dumps({"check": "cuda", "ok": False, "why": "no CUDA GPU"}))
        return
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))
    cfg = ModelConfig(arch="llama", n_layer=12, n_head=12, n_kv_head=4, n_embd=768, block_size=1024,
                      vocab_size=50304, bias=False)
    for check in (flash, compiled):
        try:
            print(json.dumps(check(cfg)), flush=True)
        except Exception as e:  # report and go on: this is a probe, not a test
            print(json.dumps({"check": check.__name__, "ok": False, "why": f"{type(e).__name__}: {e}"[:300]}))


if __name__ == "__main__":
    main()
