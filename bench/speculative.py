"""Speculative decoding at batch 1: SmolLM2-135M-Instruct with a small draft model and with prompt lookup (n-gram),
against transformers `generate`, its assisted generation (`assistant_model=`) and its prompt lookup
(`prompt_lookup_num_tokens=`), same weights, same prompts, same run. Greedy.

Rows (JSON lines): tokens_per_s (new tokens over the wall time of the generate calls, prompt by prompt, prefill
included), acceptance_rate (llmkit: accepted / drafted), tokens_per_target_forward (both: new tokens per forward
pass of the 135M model, counted with a hook on transformers' side), same_text (the greedy tokens equal the same
implementation's plain decoding on every prompt). The header line holds the machine (CPU model and flags), the
streaming-read bandwidth and the GEMV rate of the target's own weight matrices.

`--breakdown` adds where a batch-1 decode step's time goes, for the target and the draft: `gemv_ms` (every weight
matrix once as F.linear on one row, as stored before decoding), `gemv_colmajor_ms` (the same matrices stored
column-major, the layout infer/step.py gives fp32 CPU models), `step_ms` / `step_fast_ms` (one decode step + argmax
through the plain model / through `fast_forward`), `verify_ms` / `verify_fast_ms` (the same with the k + 1 tokens
of a verification pass: what speculation pays per target forward), `overhead_ms` (the same step on a model of the
same depth and heads with tiny widths and vocabulary: Python, dispatch and small-op cost, almost no weight traffic),
`cache_ms` (the KV-cache writes of one step), `sample_ms` (argmax over the vocabulary + the host copy).
Each figure is the best of `--reps` calls, alternating, so a shared machine's noise inflates it least.

    python bench/speculative.py [--draft-run runs/distill-...] [--rounds 2] [--dtypes float32,bfloat16]
                                [--max-new-tokens 64] [--draft-tokens 5] [--breakdown]

Without `--draft-run` the draft is a randomly initialised student of the draft shape (6 layers, 256 wide, SmolLM2's
vocabulary): it exercises the code and shows the cost of drafting, but accepts almost nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from generate_throughput import DTYPES, read_bandwidth, smollm2_twins
from llmkit.config import MODEL_PRESETS, ModelConfig
from llmkit.data.tokenizer import end_of_turn_ids
from llmkit.infer.api import LLM, load
from llmkit.infer.generate import SamplingConfig
from llmkit.infer.step import fast_forward
from llmkit.interop.hf import hf_config, to_hf_state_dict
from llmkit.model import build_model
from train_throughput import machine

PASSAGE = ("The lighthouse keeper on Varrow Skerry logged every ship by hand: its flag, its heading, the hour, and "
           "whether it answered his lamp. In forty-one years he missed three nights, all in the storm winter of "
           "1887, when the oil froze in the reservoir and he climbed the tower with a candle in a jam jar.")
CODE = ("def mean_gap(values):\n    gaps = []\n    for i in range(1, len(values)):\n        gaps.append(values[i] - "
        "values[i - 1])\n    return sum(gaps) / len(gaps)\n")
# Written for this bench (in no training set). The first three copy from the prompt (prompt lookup's case), the
# last three do not.
PROMPTS = [
    f"Repeat the following passage word for word.\n\n{PASSAGE}",
    f"Rewrite this function so that it returns 0.0 for lists shorter than two items. Show the whole function.\n\n"
    f"{CODE}",
    f"Summarise this passage in two sentences, reusing its wording.\n\n{PASSAGE}",
    "Invent a recipe for a soup made from turnips, smoked paprika and pears, and explain each step.",
    "Write a short letter from a sea otter to the city council asking for a quieter harbour.",
    "Explain to a ten-year-old why the sky turns orange at sunset.",
]
DRAFT_SHAPE = dict(n_layer=6, n_embd=256, n_head=4, n_kv_head=2, intermediate_size=768, block_size=2048)


def chat_ids(llm: LLM, prompts: list[str]) -> list[list[int]]:
    tok = llm.tokenizer
    return [tok.encode_prompt(tok.apply_chat_template([{"role": "user", "content": p}])) for p in prompts]


def gemv_rate(dtype: torch.dtype, reps: int = 5) -> float:
    """Bytes per second the matrix-vector kernels stream on SmolLM2-135M's matrix shapes (random weights, one row)."""
    C, inter, L, V = 576, 1536, 30, 49152
    shapes = [(960, C), (C, C), (2 * inter, C), (C, inter)] * L + [(V, C)]
    weights = [torch.randn(s, dtype=dtype) for s in shapes]
    rows = {n: torch.randn(1, n, dtype=dtype) for n in (C, inter)}  # (1, in)
    ms = best_ms({"gemv": lambda: [F.linear(rows[w.shape[1]], w) for w in weights]}, reps)["gemv"]
    return sum(w.numel() * w.element_size() for w in weights) / ms * 1e3


def hf_twin(model: torch.nn.Module, dtype: torch.dtype):
    """transformers' LlamaForCausalLM with an llmkit model's weights (llmkit's own HF export)."""
    import transformers

    kw = {k: v for k, v in hf_config(model.cfg).items() if k not in ("architectures", "model_type")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, attn_implementation="sdpa"))
    state = {k: v.contiguous().float() for k, v in model.state_dict().items()}
    hf.load_state_dict(to_hf_state_dict(state, model.cfg), strict=False)
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    return hf.to(dtype).eval()


def draft_model(args, dtype: str) -> LLM | torch.nn.Module:
    if args.draft_run:
        return load(args.draft_run, device="cpu", dtype=dtype)
    torch.manual_seed(0)
    cfg = ModelConfig(**{**MODEL_PRESETS["smollm2-135m"], **DRAFT_SHAPE})
    return build_model(cfg).to(DTYPES[dtype]).eval()


class Counter:
    """Counts forward calls of a transformers model (its target passes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.n = 0
        model.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))


@torch.inference_mode()
def run_hf(hf, counter: Counter, ids: list[list[int]], new: int, eos: list[int], **extra) -> dict:
    toks, secs, fwd = [], 0.0, 0
    kw = dict(do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=eos[0], **extra)
    hf.generate(torch.tensor([ids[0]]), **{**kw, "max_new_tokens": 4})  # warm-up
    for row in ids:
        x = torch.tensor([row])  # (1, T)
        counter.n = 0
        t0 = time.perf_counter()
        out = hf.generate(x, attention_mask=torch.ones_like(x), **kw)
        secs += time.perf_counter() - t0
        fwd += counter.n
        toks.append(out[0, len(row):].tolist())
    toks = [t[: t.index(e) + 1] if (e := next((x for x in t if x in eos), None)) is not None else t for t in toks]
    n = sum(map(len, toks))
    return {"tokens": toks, "tokens_per_s": n / secs, "tokens_per_target_forward": n / fwd}


def run_llmkit(llm: LLM, ids: list[list[int]], new: int, eos: set[int], **draft) -> dict:
    cfg = SamplingConfig(max_new_tokens=new, temperature=0)
    llm.generate([ids[0]], config=SamplingConfig(max_new_tokens=4, temperature=0), eos_ids=eos, **draft)  # warm-up
    gens, secs = [], 0.0
    for row in ids:
        t0 = time.perf_counter()
        gens += llm.generate([row], config=cfg, eos_ids=eos, **draft)
        secs += time.perf_counter() - t0
    n = sum(len(g.token_ids) for g in gens)
    drafted = sum(g.drafted or 0 for g in gens)
    out = {"tokens": [g.token_ids for g in gens], "tokens_per_s": n / secs,
           "decode_tokens_per_s": n / sum(g.decode_seconds for g in gens)}
    if draft:
        out |= {"acceptance_rate": sum(g.accepted for g in gens) / max(drafted, 1),
                "tokens_per_target_forward": n / sum(g.target_forwards for g in gens)}
    return out


def best_ms(fns: dict, reps: int) -> dict[str, float]:
    """Best wall time of each callable, calls alternating so shared-machine noise spreads over all of them."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return {k: round(v, 3) for k, v in best.items()}


@torch.inference_mode()
def breakdown(name: str, model: torch.nn.Module, dtype: str, reps: int, verify: int, ctx: int = 100) -> dict:
    """Where one batch-1 decode step's time goes (see the module docstring)."""
    cfg = model.cfg
    tiny_cfg = ModelConfig(**{**vars(cfg), "n_embd": 4 * cfg.n_head, "intermediate_size": 16, "vocab_size": 64,
                              "pad_vocab_multiple": 1, "block_size": 2 * ctx})
    plain = build_model(cfg).to(DTYPES[dtype]).eval()
    plain.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    tiny = build_model(tiny_cfg).to(DTYPES[dtype]).eval()
    weights = [m.weight for m in plain.modules() if isinstance(m, torch.nn.Linear)]
    rows = {w.shape[1]: torch.randn(1, 1, w.shape[1], dtype=DTYPES[dtype]) for w in weights}  # (1, 1, in)
    colmajor = [w.t().contiguous().t() for w in weights]
    gemv_bytes = sum(w.numel() * w.element_size() for w in weights)

    def stepper(m: torch.nn.Module, fwd, t: int = 1) -> callable:
        """One forward of t tokens over a ctx-token cache + argmax: a decode step (t = 1) or a verify pass."""
        cache = m.new_cache(1, ctx + t)
        fwd(torch.randint(0, m.cfg.vocab_size, (1, ctx)), cache=cache, logits_slice=slice(-1, None))
        tok = torch.ones(1, t, dtype=torch.long)  # (1, t)

        def step() -> None:
            out = fwd(tok, cache=cache)
            cache.rewind(ctx)
            out.logits[:, -1, : m.cfg.vocab_size].float().argmax(-1).tolist()
        return step

    cache = plain.new_cache(1, ctx + 1)
    kv = torch.randn(1, cfg.n_kv_head, 1, cfg.head_dim, dtype=DTYPES[dtype])  # (1, nkv, 1, hs)
    logits = torch.randn(1, 1, cfg.padded_vocab_size, dtype=DTYPES[dtype])  # (1, 1, V)
    fast = build_model(cfg).to(DTYPES[dtype]).eval()
    fast.load_state_dict(plain.state_dict())
    ms = best_ms({
        "gemv_ms": lambda: [F.linear(rows[w.shape[1]], w) for w in weights],
        "gemv_colmajor_ms": lambda: [F.linear(rows[w.shape[1]], w) for w in colmajor],
        "step_ms": stepper(plain, plain),
        "step_fast_ms": stepper(fast, fast_forward(fast)),
        "verify_ms": stepper(plain, plain, verify),  # k + 1 positions at once, as speculative decoding checks them
        "verify_fast_ms": stepper(fast, fast_forward(fast), verify),
        "overhead_ms": stepper(tiny, tiny),
        "cache_ms": lambda: [cache.update(i, kv, kv) for i in range(cfg.n_layer)],
        "sample_ms": lambda: logits[:, -1, : cfg.vocab_size].float().argmax(-1).tolist(),
    }, reps)
    return {"bench": "speculative", "breakdown": name, "dtype": dtype, "context": ctx, "verify_tokens": verify, **ms,
            "gemv_gb_s": round(gemv_bytes / ms["gemv_ms"] / 1e6, 2),
            "params_m": round(plain.num_params(False) / 1e6, 1),
            "threads": torch.get_num_threads()}


def bench_dtype(args, dtype: str) -> None:
    ours, hf, tok = smollm2_twins(DTYPES[dtype])
    llm = LLM(model=ours, tokenizer=tok, path=Path("smollm2-135m-instruct"))
    draft = draft_model(args, dtype)
    draft_llm = draft if isinstance(draft, LLM) else LLM(model=draft, tokenizer=tok, path=Path("random-student"))
    hf_draft = hf_twin(draft_llm.model, DTYPES[dtype])
    counter = Counter(hf)
    eos = end_of_turn_ids(tok)
    ids = chat_ids(llm, PROMPTS)
    new, k = args.max_new_tokens, args.draft_tokens
    rows = {
        "hf": lambda: run_hf(hf, counter, ids, new, eos),
        "hf_assisted": lambda: run_hf(hf, counter, ids, new, eos, assistant_model=hf_draft,
                                      num_assistant_tokens=k, num_assistant_tokens_schedule="constant"),
        "hf_prompt_lookup": lambda: run_hf(hf, counter, ids, new, eos, prompt_lookup_num_tokens=k),
        "llmkit": lambda: run_llmkit(llm, ids, new, set(eos)),
        "llmkit_ngram": lambda: run_llmkit(llm, ids, new, set(eos), draft="ngram", draft_tokens=k),
        "llmkit_draft": lambda: run_llmkit(llm, ids, new, set(eos), draft=draft_llm, draft_tokens=k),
    }
    only = set(args.only.split(",")) if args.only else set(rows)
    rows = {name: fn for name, fn in rows.items() if name in only | {"hf", "llmkit"}}  # the references always run
    best: dict[str, dict] = {}
    for _ in range(args.rounds):  # alternate the rows, keep each one's best round
        for name, fn in rows.items():
            t0 = time.perf_counter()
            got = fn()
            print(f"# {dtype} {name}: {got['tokens_per_s']:.2f} tokens/s ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
            if name not in best or got["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = got
    for name, got in best.items():
        plain = best["hf" if name.startswith("hf") else "llmkit"]["tokens"]
        peer = best["hf"]["tokens_per_s"]
        print(json.dumps({"bench": "speculative", "impl": name, "dtype": dtype, "batch": 1, "prompts": len(ids),
                          "max_new_tokens": new, "draft_tokens": k if name not in ("hf", "llmkit") else None,
                          "draft": args.draft_run or "random-init student" if "draft" in name or "assisted" in name
                          else ("ngram" if "ngram" in name or "lookup" in name else None),
                          "new_tokens": sum(map(len, got["tokens"])),
                          **{key: round(v, 3) for key, v in got.items() if key != "tokens"},
                          "over_hf": round(got["tokens_per_s"] / peer, 3), "same_text": got["tokens"] == plain,
                          "same_text_as_hf": got["tokens"] == best["hf"]["tokens"]}), flush=True)
    if args.breakdown:
        print(json.dumps(breakdown("smollm2-135m-instruct", ours, dtype, args.reps, k + 1)), flush=True)
        print(json.dumps(breakdown("draft", draft_llm.model, dtype, args.reps, k + 1)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draft-run", default=None, help="the draft model (a distilled student's run folder, any "
                    "source llmkit loads); default: a randomly initialised student of the draft shape")
    ap.add_argument("--rounds", type=int, default=2, help="passes over all rows; each row keeps its best")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="most new tokens per prompt (end of turn stops)")
    ap.add_argument("--draft-tokens", type=int, default=5, help="tokens drafted per target pass (k)")
    ap.add_argument("--breakdown", action="store_true", help="also time the parts of one decode step")
    ap.add_argument("--reps", type=int, default=20, help="repetitions of each --breakdown timing (best counts)")
    ap.add_argument("--only", default=None, help="comma-separated rows to run (default all): hf, hf_assisted, "
                    "hf_prompt_lookup, llmkit, llmkit_ngram, llmkit_draft")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's own; "
                    "1 is steadier on a machine shared with other jobs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({**machine(), "bench": "speculative", "read_bandwidth_gb_s": round(read_bandwidth() / 1e9, 1),
                      "gemv_gb_s": {d: round(gemv_rate(DTYPES[d]) / 1e9, 2) for d in args.dtypes.split(",")},
                      "prompts": PROMPTS}), flush=True)
    for dtype in args.dtypes.split(","):
        bench_dtype(args, dtype)


if __name__ == "__main__":
    main()
