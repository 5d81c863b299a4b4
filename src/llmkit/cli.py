"""`llmkit <verb>`: one entry point. Option help comes from the config dataclasses' field docstrings.

Any `LLMKitError` (bad value, missing file, empty corpus, unknown key) is printed as one `error: ...` line with
exit status 2: users see what to fix, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path
from typing import Any

from llmkit.config import coerce, field_docs
from llmkit.errors import LLMKitError


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` option per dataclass field, typed and documented by the dataclass itself."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] == list[str]:
            parser.add_argument(flag, action="append", default=None, metavar="STR",
                                help=f"{docs.get(f.name, '')} Repeatable.")
        else:
            parser.add_argument(flag, default=None, metavar=f.name.upper(),
                                help=f"{docs.get(f.name, '')} (default: {default})")


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            kwargs[f.name] = value if hints[f.name] == list[str] else coerce(value, hints[f.name], "--" + f.name)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------- verbs


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from llmkit.data import iter_documents
    from llmkit.tokenizer import Tokenizer

    if args.kind == "gpt2":
        tok = Tokenizer.gpt2()
    elif args.kind == "wordpiece":
        from llmkit.wordpiece import train_wordpiece

        tok = train_wordpiece((text for _, text in iter_documents(args.corpus, args.text_field)), args.vocab_size)
    else:
        texts = (text for _, text in iter_documents(args.corpus, args.text_field))
        tok = Tokenizer.train_char(texts) if args.kind == "char" else Tokenizer.train_bpe(texts, args.vocab_size)
    out = tok.save(args.out)
    print(f"{args.kind} tokenizer with {tok.vocab_size:,} tokens written to {out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from llmkit.data import prepare

    meta = prepare(args.corpus, args.tokenizer, args.out, val_fraction=args.val_fraction,
                   text_field=args.text_field, quiet=args.quiet)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    print(f"{meta['documents']} documents -> {tr['tokens']:,} train / {va['tokens']:,} val tokens "
          f"({(tr['bytes'] + va['bytes']) / max(1, tr['tokens'] + va['tokens']):.2f} bytes per token) in {args.out}")


def cmd_pretrain(args: argparse.Namespace, extra: list[str]) -> None:
    from llmkit.config import load_run_config, parse_override_args
    from llmkit.pretrain import pretrain

    overrides: dict[str, Any] = parse_override_args(extra)
    if args.data:
        overrides["data.path"] = args.data
    if args.max_steps is not None:
        overrides["train.max_steps"] = args.max_steps
    out = Path(args.out)
    config_file = args.config
    if args.resume and config_file is None:
        config_file = out / "config.yaml"  # resume with the config the run was started with
    if config_file is None:
        raise LLMKitError("pretrain needs --config FILE (see configs/ for recipes)")
    cfg = load_run_config(config_file, overrides)
    result = pretrain(cfg, out, resume=args.resume, quiet=args.quiet)
    import torch.distributed as dist

    if dist.is_initialized():  # under torchrun: leave the group cleanly, let rank 0 speak
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank:
            return
    summary = {"run": str(out), "step": result.step, f"best_{cfg.train.select_metric}": result.best_val,
               **{k: v for k, v in result.last.items() if k.startswith("val_")}}
    print(json.dumps(summary) if args.json else "done: " + "  ".join(f"{k} {v}" for k, v in summary.items()))


def cmd_generate(args: argparse.Namespace) -> None:
    from llmkit.api import load
    from llmkit.generate import SamplingConfig

    cfg = dataclass_from_args(SamplingConfig, args)
    llm = load(args.model, device=args.device, dtype=args.dtype)
    prompts = args.prompt or [""]
    shown, eos_ids = prompts, None
    if args.chat:  # each prompt is one user turn through the model's chat template; stop at end of turn
        from llmkit.convert import end_of_turn_ids

        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [llm.tokenizer.apply_chat_template(system + [{"role": "user", "content": p}]) for p in prompts]
        eos_ids, shown = set(end_of_turn_ids(llm.tokenizer)), [""] * len(prompts)
    stream = len(prompts) == 1 and not args.json and (args.stream or sys.stdout.isatty())
    t0 = time.perf_counter()
    if stream:
        sys.stdout.write(shown[0])
        sys.stdout.flush()

    def on_text(_: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    results = llm.generate(prompts, on_text=on_text if stream else None, config=cfg, eos_ids=eos_ids)
    dt = time.perf_counter() - t0
    n_tokens = sum(len(r.token_ids) for r in results)
    if stream:
        print()
    for r, prompt in zip(results, args.prompt or [""]):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": r.text, "tokens": len(r.token_ids),
                              "finish_reason": r.finish_reason, "tokens_per_s": round(n_tokens / dt, 2)}))
        elif not stream:
            print(r.text.strip() if args.chat else r.prompt + r.text)
            if len(results) > 1:
                print("-" * 40)


def cmd_eval(args: argparse.Namespace) -> None:
    from llmkit.api import load
    from llmkit.evaluate import evaluate_lm

    llm = load(args.model, device=args.device, dtype=args.dtype)
    res = evaluate_lm(llm, args.data, split=args.split, batch_size=args.batch_size, quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['data']}: loss {res['loss']:.4f}  perplexity {res['perplexity']:.2f}  "
              f"bits/byte {res['bits_per_byte']:.4f}  ({res['tokens']:,} tokens, {res['bytes']:,} bytes)")


MODEL_HELP = "llmkit run folder, Hugging Face folder, .gguf file or built-in name (see `llmkit models`)"


def build_parser() -> argparse.ArgumentParser:
    from llmkit import cli_models, cli_tasks
    from llmkit.config import help_text
    from llmkit.generate import SamplingConfig

    p = argparse.ArgumentParser(prog="llmkit", description="Make language models end to end: tokenizer, data, "
                                "pretraining, fine-tuning, generation, evaluation, conversion, chat.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    tok = sub.add_parser("tokenizer", help="train or export a tokenizer")
    tsub = tok.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a byte-level BPE or char tokenizer, or write GPT-2's",
                        description="Train a tokenizer on a corpus and write tokenizer.json (+ config) to --out.")
    t.add_argument("--corpus", default="shakespeare", help="built-in corpus name, text file, folder or JSONL")
    t.add_argument("--kind", choices=["bpe", "char", "gpt2", "wordpiece"], default="bpe",
                   help="bpe: byte-level BPE; char: one token per character; gpt2: the real GPT-2 vocabulary; "
                        "wordpiece: BERT's (lowercased, [CLS]/[SEP]/[MASK]) for encoders")
    t.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size, special tokens included")
    t.add_argument("--text-field", default="text", help="JSONL field holding the text")
    t.add_argument("--out", required=True, help="folder to write")
    t.set_defaults(fn=cmd_tokenizer_train)

    pr = sub.add_parser("prepare", help="tokenize a corpus into train/val token shards",
                        description="Stream a corpus through a tokenizer into train.bin / val.bin + meta.json.")
    pr.add_argument("--corpus", default="shakespeare", help="built-in corpus name, text file, folder or JSONL")
    pr.add_argument("--tokenizer", required=True, help="tokenizer folder (from `llmkit tokenizer train`)")
    pr.add_argument("--out", required=True, help="folder for the shards")
    pr.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out for validation")
    pr.add_argument("--text-field", default="text", help="JSONL field holding the text")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(fn=cmd_prepare)

    pt = sub.add_parser("pretrain", help="train a model from scratch on token shards",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Run the training loop. Any config key can be overridden as --section.key VALUE.",
                        epilog="config keys:\n" + "\n".join(help_text()))
    pt.add_argument("--config", help="YAML recipe (e.g. configs/demo.yaml)")
    pt.add_argument("--data", help="token shard folder (overrides data.path)")
    pt.add_argument("--out", default="runs/latest", help="run folder")
    pt.add_argument("--max-steps", type=int, help="overrides train.max_steps")
    pt.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    pt.add_argument("--json", action="store_true", help="print the final summary as JSON")
    pt.add_argument("--quiet", action="store_true", help="no progress bar")
    pt.set_defaults(fn=cmd_pretrain, takes_extra=True)

    g = sub.add_parser("generate", help="continue a prompt with a trained model",
                       description="Generate text. Several --prompt options run as one left-padded batch.")
    g.add_argument("--model", required=True, help=MODEL_HELP)
    g.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as one user turn in the chat template "
                   "and stop at the end-of-turn token")
    g.add_argument("--system", help="system prompt for --chat")
    add_dataclass_args(g, SamplingConfig)
    g.add_argument("--device", default="auto", help="cpu, cuda or auto")
    g.add_argument("--dtype", default="float32", help="float32 or bfloat16 weights")
    g.add_argument("--stream", action="store_true", help="stream tokens even when stdout is not a terminal")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("eval", help="loss, perplexity and bits per byte on a split or a text file")
    e.add_argument("--model", required=True, help=MODEL_HELP)
    e.add_argument("--data", required=True, help="prepared data folder or a UTF-8 text file")
    e.add_argument("--split", default="val", help="split of a data folder")
    e.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    e.add_argument("--device", default="auto", help="cpu, cuda or auto")
    e.add_argument("--dtype", default="float32", help="float32 or bfloat16 weights")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(fn=cmd_eval)

    cli_models.register(sub)  # convert, models, chat
    cli_tasks.register(sub)  # finetune, classify, embed, search
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if getattr(args, "takes_extra", False):
            args.fn(args, extra)
        else:
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.fn(args)
    except LLMKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
