"""CLI verbs that make a model smaller: `llmkit quantize`, `llmkit prune`, `llmkit compare` (registered by
cli/main.py). Each verb's parser is built by its own function so the three can grow independently."""

from __future__ import annotations

import argparse

from llmkit.cli.common import MODEL_HELP, add_device_args, int_at_least


def cmd_quantize(args: argparse.Namespace) -> None:
    import json

    from llmkit.compress.quantize import QuantSpec, quantize

    spec = QuantSpec(to=args.to, group_size=args.group_size, method=args.method, calib=args.calib,
                     calib_seqs=args.calib_seqs, seq_len=args.calib_len, act_order=args.act_order)
    res = quantize(args.model, args.out, spec, quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps(res))
        return
    how = f"{res['to']}" + (f" g{res['group_size']}" if "group_size" in res else "") + f", {res['method']}"
    calib = f", {res['calib_seqs']} calibration windows of {res['seq_len']} tokens" if "calib_seqs" in res else ""
    print(f"{args.model} -> {res['out']} ({how}{calib}; embeddings int8): {res['bytes'] / 2**20:.1f} MiB")


def cmd_prune(args: argparse.Namespace) -> None:
    import json

    from llmkit.compress.prune import PruneSpec, prune_model

    spec = PruneSpec(method=args.method, sparsity=args.sparsity, pattern=args.pattern,
                     parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()), calib=args.calib,
                     calib_seqs=args.calib_seqs, calib_len=args.calib_len, seed=args.seed)
    quiet = args.quiet or args.json
    report = prune_model(args.model, spec, args.out, recover_steps=args.recover_steps, data=args.data,
                         recover_lora=args.recover_lora, recover_lr=args.recover_lr,
                         recover_batch_size=args.recover_batch_size, recover_seq_len=args.recover_seq_len,
                         device=args.device, quiet=quiet)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "zero_fraction_per_layer"}))
        return
    line = (f"pruned {args.model} ({spec.method}{' ' + spec.pattern if spec.pattern else ''}, sparsity "
            f"{spec.sparsity:g}) -> {args.out}: {report['params_before'] / 1e6:.2f} M -> "
            f"{report['params_after'] / 1e6:.2f} M parameters, {report['bytes'] / 2**20:.1f} MiB, zeros "
            f"{report['zero_fraction_layers']:.1%} of the pruned layers ({report['zero_fraction_model']:.1%} of all "
            "weights)")
    if spec.method == "structured":
        line += (f"; per layer n_head {report['n_head']}, n_kv_head {report['n_kv_head']}, intermediate_size "
                 f"{report['intermediate_size']}")
    else:
        line += "; storage stays dense: same file size and speed (zeros are not skipped by dense matmuls)"
    print(line)
    if "recovery" in report:
        r = report["recovery"]
        print(f"recovery: {r['steps']} steps ({'LoRA' if r['lora'] else 'full'}, lr {r['lr']:g}) on {r['data']}: "
              f"val perplexity {r['val_perplexity_before']:.2f} -> {r['val_perplexity_after']:.2f}")


def cmd_compare(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from llmkit.compress.compare import compare, plot, table

    if args.plot and not args.plot.endswith(".png"):
        from llmkit.errors import ConfigError

        raise ConfigError(f"--plot {args.plot}: give a file name ending in .png")
    rows = compare(args.model, args.data, max_tokens=args.max_tokens, context=args.context,
                   decode_tokens=args.decode_tokens, speed_reps=args.speed_reps, device=args.device,
                   dtype=args.dtype, quiet=args.quiet or args.json)
    if args.plot:
        plot(rows, Path(args.plot))
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(table(rows))
    if args.plot:
        print(f"plot: {args.plot}")


def _quantize_parser(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="weight-only int8 / int4 quantisation into a run folder every verb loads",
                       description="Quantise a decoder's weights: the Linear layers of every Transformer block to "
                       "--to (int8: one scale per output channel; int4: a scale and a zero point per group of "
                       "--group-size input weights), the embedding and output head to int8 per row. The result "
                       "is an ordinary run folder (packed codes + scales in model.safetensors, the settings in "
                       "source.json) that generate, eval, chat and serve load; matmuls run on PyTorch's packed "
                       "int8/int4 kernels. --method gptq calibrates on real text and is what int4 needs on "
                       "small models.")
    q.add_argument("--model", required=True, help=MODEL_HELP + " (float weights; a quantised one is refused)")
    q.add_argument("--to", required=True, help="int8 (per output channel, near lossless) or int4 (group-wise)")
    q.add_argument("--group-size", type=int_at_least(1), default=64,
                   help="int4: input weights sharing one scale and zero: 32, 64 or 128 (must divide every layer's "
                   "input width; smaller is more accurate and a little larger on disk; default 64)")
    q.add_argument("--method", default="rtn", help="rtn (round to nearest, no data) or gptq (column-by-column "
                   "error compensation from calibration inputs; minutes on a CPU for a 135 M model; default rtn)")
    add_calib_args(q, "gptq", seq_len=512)
    q.add_argument("--act-order", action="store_true", help="gptq: quantise columns in order of decreasing "
                   "input energy (static groups, so the packed kernels still apply)")
    q.add_argument("--out", required=True, help="run folder to write: new, empty, or a model folder llmkit wrote "
                   "(replaced atomically; nothing is written when a check fails)")
    q.add_argument("--json", action="store_true", help="print one JSON object (path, bytes, settings)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(fn=cmd_quantize)


def add_calib_args(p: argparse.ArgumentParser, who: str, seq_len: int) -> None:
    """--calib, --calib-seqs, --calib-len: the calibration text quantize and prune read the same way."""
    p.add_argument("--calib", help=f"{who} calibration text: a text file, folder, JSONL, `llmkit prepare` folder "
                   "(its train split) or built-in corpus name (default: shakespeare)")
    p.add_argument("--calib-seqs", type=int_at_least(1), default=128,
                   help=f"{who}: calibration windows drawn from --calib (default 128)")
    p.add_argument("--calib-len", type=int_at_least(2), default=seq_len,
                   help=f"{who}: tokens per calibration window (capped at the model's context; default {seq_len})")


def _prune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="remove weights: unstructured, 2:4, or whole heads and MLP neurons",
                       description="Unstructured (magnitude, wanda) and N:M pruning zero weights but keep dense "
                       "storage: the file and the decode speed stay the same. --method structured removes whole "
                       "MLP neurons / attention heads, the same number in every layer: the matrices, the file and "
                       "the decode time shrink. The result is a run folder every verb loads.")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--method", required=True, help="magnitude (smallest |W| per matrix), wanda (smallest "
                   "|W| x ||X|| per output row, X from --calib) or structured (whole neurons / heads by their "
                   "output norm on --calib)")
    p.add_argument("--sparsity", type=float, required=True, help="fraction removed, in [0, 1): of each matrix's "
                   "weights (magnitude, wanda), or of each layer's neurons / heads (structured)")
    p.add_argument("--pattern", help="N:M semi-structured, e.g. 2:4 (keep 2 of every 4 consecutive inputs; "
                   "needs --sparsity 0.5)")
    p.add_argument("--parts", default="mlp", help="structured: what to remove, comma-separated: mlp (neurons), "
                   "heads (the same number of query heads from every KV group) or kv_groups (whole KV heads with "
                   "their query heads)")
    add_calib_args(p, "wanda / structured", seq_len=256)
    p.add_argument("--recover-steps", type=int_at_least(0), default=0, help="steps of recovery fine-tuning "
                   "after pruning (0 = none), next-token loss on --data")
    p.add_argument("--data", help="recovery data: a folder written by `llmkit prepare` with the model's tokenizer")
    p.add_argument("--recover-lora", action="store_true", help="recover through LoRA adapters (merged back) "
                   "instead of training every weight")
    p.add_argument("--recover-lr", type=float, help="recovery peak learning rate (default 1e-4 full, 1e-3 LoRA)")
    p.add_argument("--recover-batch-size", type=int_at_least(1), default=8, help="recovery sequences per step")
    p.add_argument("--recover-seq-len", type=int_at_least(2), default=256, help="recovery tokens per sequence")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and recovery batches")
    p.add_argument("--out", required=True, help="run folder to write (new, empty, or an earlier llmkit output)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_prune)


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="size, speed, perplexity, KL and same-top-token of several models",
                       description="llama.cpp's quantisation report for any models that share a tokenizer: for "
                       "each, the size of its weight files, greedy decode tokens/s at batch 1, perplexity on "
                       "--data, ΔPPL, the mean KL divergence KL(first || model) over every predicted token and "
                       "the percentage of positions where both pick the same top token. The first --model is the "
                       "reference (typically the float original). Models run one at a time.")
    c.add_argument("--model", action="append", required=True, help=MODEL_HELP + " (repeat for each model; "
                   "the first is the reference)")
    c.add_argument("--data", required=True, help="text to score: a UTF-8 text file, or a folder written by "
                   "`llmkit prepare` (its val split); use text none of the models trained on")
    c.add_argument("--max-tokens", type=int_at_least(2), default=4096,
                   help="score the first N tokens of --data (default 4096)")
    c.add_argument("--context", type=int_at_least(2), default=512,
                   help="window length: each window's tokens see only the window before them (capped at the "
                   "model's context; default 512, llama.cpp's perplexity default)")
    c.add_argument("--decode-tokens", type=int_at_least(1), default=64,
                   help="tokens generated per timed decode run (default 64)")
    c.add_argument("--speed-reps", type=int_at_least(1), default=2,
                   help="timed decode runs per model; the fastest counts (default 2)")
    add_device_args(c)
    c.add_argument("--plot", help="also draw size x perplexity x speed with the Pareto frontiers to this .png")
    c.add_argument("--json", action="store_true", help="print one JSON object per model (model, bytes, "
                   "perplexity, delta_ppl, delta_ppl_pct, kl_divergence, same_top_token in percent, "
                   "decode_tokens_per_s, ...) instead of the table")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(fn=cmd_compare)


def register(sub: argparse._SubParsersAction) -> None:
    _quantize_parser(sub)
    _prune_parser(sub)
    _compare_parser(sub)
