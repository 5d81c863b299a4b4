"""Decode throughput: llmkit `generate` vs transformers `generate`, same weights, same run: the gpt2-124m shape
(random weights) and the real SmolLM2-135M-Instruct (built-in GGUF; transformers loads the same file).

Both decode greedily with a KV cache for a fixed number of new tokens (no early stop) from the same prompts.
tokens_per_s counts generated tokens of all rows over the whole call (prefill of a short prompt included).
At batch 1 decoding is bound by reading every weight once per token, so the line `bandwidth_bound_tokens_per_s`
is the measured memory read bandwidth divided by the weight bytes: how fast a perfect implementation could go.

    python bench/generate_throughput.py [--new-tokens 64] [--batches 1,8] [--dtypes float32,bfloat16]
                                        [--models gpt2-124m,smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from llmkit.config import MODEL_PRESETS, ModelConfig
from llmkit.data.tokenizer import Tokenizer
from llmkit.infer.generate import SamplingConfig, generate
from llmkit.interop.hf import from_hf_state_dict, hf_config
from llmkit.model import build_model

PROMPTS = ["The meaning of life is", "Once upon a time, in a land far away,", "ROMEO:", "def fibonacci(n):",
           "The quick brown fox", "In the beginning God created", "Hello, my name is", "To be, or not to be"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def read_bandwidth() -> float:
    """Bytes per second that a streaming reduction reads from memory (best of a few passes over 1 GiB)."""
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0))
    return best


def twins(cfg: ModelConfig, dtype: torch.dtype):
    import transformers

    kw = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type")}
    if cfg.arch == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw, attn_implementation="sdpa"))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, attn_implementation="sdpa"))
    ours = build_model(cfg)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg, ours.state_dict()), strict=False)
    return ours.to(dtype).eval(), hf.to(dtype).eval()


def smollm2_twins(dtype: torch.dtype):
    """llmkit's built-in SmolLM2 (cached conversion of the packaged GGUF) and transformers on the same GGUF."""
    import transformers

    import llmkit
    from llmkit.interop.registry import builtin_source

    lm = llmkit.load("smollm2-135m-instruct", device="cpu", dtype=str(dtype).removeprefix("torch."))
    src = builtin_source("smollm2-135m-instruct")
    hf = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    hf.generation_config.eos_token_id = None  # decode the full length on both sides
    return lm.model.eval(), hf.to(dtype).eval(), lm.tokenizer


def time_llmkit(model, tok: Tokenizer, prompts: list[str], new: int) -> tuple[float, list[list[int]]]:
    cfg = SamplingConfig(max_new_tokens=new, temperature=0)
    generate(model, tok, prompts, SamplingConfig(max_new_tokens=4, temperature=0), eos_ids=set())  # warm-up
    t0 = time.perf_counter()
    out = generate(model, tok, prompts, cfg, eos_ids=set())
    return len(prompts) * new / (time.perf_counter() - t0), [o.token_ids for o in out]


@torch.inference_mode()
def time_hf(model, tok: Tokenizer, prompts: list[str], new: int) -> tuple[float, list[list[int]]]:
    encoded = [tok.encode(p) for p in prompts]
    L = max(map(len, encoded))
    ids = torch.full((len(prompts), L), tok.pad_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(encoded):
        ids[i, L - len(row):], mask[i, L - len(row):] = torch.tensor(row), 1
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=tok.pad_id, eos_token_id=None)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
    return len(prompts) * new / (time.perf_counter() - t0), out[:, L:].tolist()


def run(name: str, cfg: ModelConfig | None, tok: Tokenizer | None, args, bandwidth: float) -> None:
    """One model at each dtype and batch; `cfg=None` means the real SmolLM2 weights (and their tokenizer)."""
    for dtype in args.dtypes.split(","):
        if cfg is None:
            ours, hf, tok = smollm2_twins(DTYPES[dtype])
        else:
            ours, hf = twins(cfg, DTYPES[dtype])
        weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        for batch in map(int, args.batches.split(",")):
            prompts = (PROMPTS * 4)[:batch]
            best = {"llmkit": 0.0, "hf": 0.0}
            same = True
            for _ in range(args.rounds):  # alternate, keep each side's best: a shared machine is noisy
                a, ta = time_llmkit(ours, tok, prompts, args.new_tokens)
                b, tb = time_hf(hf, tok, prompts, args.new_tokens)
                best["llmkit"], best["hf"] = max(best["llmkit"], a), max(best["hf"], b)
                same = same and ta == tb
            bound = bandwidth / weight_bytes
            for impl, tps in best.items():
                print(json.dumps({"bench": "generate_throughput", "model": name, "impl": impl, "dtype": dtype,
                                  "batch": batch, "new_tokens": args.new_tokens, "tokens_per_s": round(tps, 2),
                                  "threads": torch.get_num_threads()}), flush=True)
            print(json.dumps({"bench": "generate_throughput", "model": name, "dtype": dtype, "batch": batch,
                              "ratio_llmkit_over_hf": round(best["llmkit"] / best["hf"], 3),
                              "same_tokens": same, "weight_bytes": weight_bytes,
                              "read_bandwidth_gb_s": round(bandwidth / 1e9, 1),
                              "bandwidth_bound_tokens_per_s": round(bound * (batch if batch == 1 else 1), 2),
                              "llmkit_fraction_of_bound": round(best["llmkit"] / bound, 3) if batch == 1 else None}),
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", default="gpt2-124m,smollm2-135m-instruct")
    args = ap.parse_args()
    torch.manual_seed(0)
    bandwidth = read_bandwidth()
    models = args.models.split(",")
    if "gpt2-124m" in models:
        cfg = ModelConfig(**{**MODEL_PRESETS["gpt2-124m"], "pad_vocab_multiple": 1})
        run("gpt2-124m", cfg, Tokenizer.gpt2(), args, bandwidth)
    if "smollm2-135m-instruct" in models:
        run("smollm2-135m-instruct", None, None, args, bandwidth)


if __name__ == "__main__":
    main()
