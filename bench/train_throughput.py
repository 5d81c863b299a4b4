"""Training throughput: llmkit's training loop vs transformers' GPT2LMHeadModel, same shape, same run.

Shape (issue 2): 6 layers, 6 heads, 384 wide, context 256, batch 8, vocab 50304. Both sides train the same way:
AdamW (fused), gradient clipping at 1.0, autocast for bf16, random tokens, no dropout. llmkit runs through its
real `train()` loop; transformers through the plain loop its users write. Each (dtype, compile) setting is
measured for both sides in alternating rounds, so that a noisy shared machine hurts both alike; each side's best
round counts. Compiled means `torch.compile` as each side's users would call it: `train.compile: true` for
llmkit (the loop compiles the model and its fused head+loss, see `train.distributed.Parallel.wrap`),
`torch.compile(model)` for transformers; the first two steps (compilation, warm-up) are not timed.

Prints a first JSON line describing the machine (lscpu model name, the CPU flags that decide bf16 speed:
avx2 / avx512f / avx512_bf16 / avx512_fp16 / amx_*, oneDNN's bf16 support, threads, load average) and the
measured matmul peaks, then one line per (impl, dtype, compile) with tokens_per_s, mfu (and, compiled, the graph
and graph-break counts), then one line with the ratios: per setting, and at each side's best setting (the
issue's figure: the best llmkit row over the best transformers row). MFU = FLOPs per token
(`Transformer.flops_per_token`: 6N + attention for this fully trained model, the same count for both sides, as
they have the same shape) x tokens/s over `runtime.peak_flops`, the best GEMM throughput measured in that dtype
over several sizes and trials (its docstring gives the method).

    python bench/train_throughput.py [--steps 6] [--rounds 2] [--dtypes auto|float32,bfloat16]
                                     [--compile both|off|on] [--device cpu|cuda]

`--dtypes auto` (the default) is float32, plus bfloat16 where oneDNN has native bf16 matmuls (AVX512-BF16 or
AMX): without them a bf16 GEMM is emulated, hundreds of times slower, and a step would take minutes.
`--compile both` (the default) measures eager and compiled; a bare `--compile` means `on` only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

import torch
from torch._dynamo.utils import counters

from llmkit.config import ModelConfig, TrainConfig
from llmkit.model import build_model
from llmkit.runtime import autocast, peak_flops
from llmkit.train.loop import train
from llmkit.train.objectives import CausalLM
from llmkit.train.optim import make_optimizer

SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50304)
BATCH = 8


class RandomBatches:
    """Random token batches with the state interface the training loop expects."""

    def __init__(self, vocab: int, batch: int, seq: int) -> None:
        self.g = torch.Generator().manual_seed(0)
        self.vocab, self.batch, self.seq = vocab, batch, seq

    def __next__(self) -> dict[str, torch.Tensor]:
        x = torch.randint(0, self.vocab, (self.batch, self.seq + 1), generator=self.g)
        return {"input_ids": x[:, :-1], "labels": x[:, 1:]}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def bench_llmkit(dtype: str, steps: int, compile_: bool, device: str = "cpu") -> float:
    cfg = ModelConfig(arch="gpt2", pad_vocab_multiple=64, **SHAPE)
    model = build_model(cfg)
    rates: list[float] = []
    tcfg = TrainConfig(max_steps=steps + 2, warmup_steps=1, eval_interval=0, log_interval=1, dtype=dtype,
                       device=device, compile=compile_)
    with tempfile.TemporaryDirectory() as tmp:
        train(model, CausalLM(), tcfg, RandomBatches(cfg.vocab_size, BATCH, cfg.block_size), [], tmp,
              tokens_per_batch=BATCH * cfg.block_size, callbacks=[lambda step, rec: rates.append(rec["tokens_per_s"])],
              quiet=True)
    return statistics.median(rates[2:])  # the first steps pay for allocation (and compilation)


def bench_hf(dtype: str, steps: int, compile_: bool, device: str = "cpu") -> float:
    import transformers

    hf_cfg = transformers.GPT2Config(n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], n_embd=SHAPE["n_embd"],
                                     n_positions=SHAPE["block_size"], vocab_size=SHAPE["vocab_size"],
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    dev = torch.device(device)
    model = transformers.GPT2LMHeadModel(hf_cfg).to(dev).train()
    net = torch.compile(model) if compile_ else model
    opt = make_optimizer(model, TrainConfig(), dev)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    batches = RandomBatches(SHAPE["vocab_size"], BATCH, SHAPE["block_size"])
    times = []
    for _ in range(steps + 2):
        b = {k: v.to(dev) for k, v in next(batches).items()}
        t0 = time.perf_counter()
        with autocast(dev, dt):
            loss = net(input_ids=b["input_ids"], labels=b["input_ids"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return BATCH * SHAPE["block_size"] / statistics.median(times[2:])


def machine() -> dict:
    """What the figures depend on: the CPU model and the flags that decide which matmul kernels exist."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
    return {"bench": "train_throughput", "cpu": fields.get("Model name", "?").strip(),
            "cpu_flags": {f: f in flags for f in wanted}, "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "threads": torch.get_num_threads(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}  # other jobs on the machine: the figures' noise


def compile_counts() -> dict[str, int]:
    """What torch.compile did since `counters.clear()`: graphs compiled, graph breaks, recompilations."""
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(counters["recompiles"].values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round (after 2 untimed warm-up steps)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per setting; the best counts")
    ap.add_argument("--dtypes", default="auto", help="comma-separated, or auto (see above)")
    ap.add_argument("--compile", nargs="?", const="on", default="both", choices=("both", "off", "on"),
                    help="torch.compile both sides: off, on, or both settings (default; a bare --compile is on)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU, auto = float32 and bfloat16)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    flops_per_token = build_model(ModelConfig(arch="gpt2", **SHAPE)).flops_per_token(SHAPE["block_size"])
    dtypes = args.dtypes.split(",") if args.dtypes != "auto" else (
        ["float32", "bfloat16"] if dev.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        else ["float32"])
    compiles = {"both": [False, True], "off": [False], "on": [True]}[args.compile]
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    peaks = {d: peak_flops(dev, table[d]) for d in dtypes}
    gpu = {"gpu": torch.cuda.get_device_name(dev)} if dev.type == "cuda" else {}
    print(json.dumps({**machine(), **gpu, "peak_tflops": {d: round(p / 1e12, 4) for d, p in peaks.items()},
                      "flops_per_token": flops_per_token}), flush=True)
    best: dict[tuple[str, str, bool], float] = {}
    for dtype in dtypes:
        for compiled in compiles:
            counts: dict[str, dict[str, int]] = {}
            for _ in range(args.rounds):
                for impl, fn in (("llmkit", bench_llmkit), ("hf", bench_hf)):
                    counters.clear()
                    tps = fn(dtype, args.steps, compiled, args.device)
                    if impl not in counts:  # the first round compiles; later ones reuse its cached code
                        counts[impl] = compile_counts()
                    best[(impl, dtype, compiled)] = max(best.get((impl, dtype, compiled), 0.0), tps)
            peak = peaks[dtype]
            for impl in ("llmkit", "hf"):
                tps = best[(impl, dtype, compiled)]
                print(json.dumps({"bench": "train_throughput", "impl": impl, "dtype": dtype, "batch": BATCH,
                                  "seq": SHAPE["block_size"], "compile": compiled, "device": args.device,
                                  "tokens_per_s": round(tps, 1),
                                  "mfu": round(tps * flops_per_token / peak, 4), "peak_tflops": round(peak / 1e12, 4),
                                  "threads": torch.get_num_threads(), **(counts[impl] if compiled else {})}),
                      flush=True)

    def name(dtype: str, compiled: bool) -> str:
        return f"{dtype}{'+compile' if compiled else ''}"

    ratios = {name(d, c): round(best[("llmkit", d, c)] / best[("hf", d, c)], 3) for d in dtypes for c in compiles}
    top = {impl: max((k for k in best if k[0] == impl), key=best.__getitem__) for impl in ("llmkit", "hf")}
    print(json.dumps({"bench": "train_throughput", "ratio_llmkit_over_hf": ratios,
                      "best_setting": {impl: name(*k[1:]) for impl, k in top.items()},
                      "ratio_best_setting_each": round(best[top["llmkit"]] / best[top["hf"]], 3),
                      "load_avg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
