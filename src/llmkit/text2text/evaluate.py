"""`llmkit eval --task text2text`: decode every pair of a split, score the outputs, keep every prediction.

Two kinds of model, one report:
- an encoder–decoder (`model.arch: mbart`, from `llmkit finetune --task text2text`) rewrites each source through
  `infer/seq2seq.seq2seq_decode` (greedy or beam search, batched, encoder run once);
- a decoder (an SFT run from `llmkit finetune --task sft`, or an instruction model such as smollm2-135m-instruct
  zero-shot) answers the same chat prompt SFT trains on (`data/pairs.sft_prompt`: the instruction, a blank line,
  the source, through the chat template), greedily through `infer/generate.generate`, stopping at the end of turn.
  The instruction is the SFT run's own (`finetune.instruction` in its config.yaml), else `--instruction`, else the
  default that SFT uses; a prompt that differs from training's by one character is a different task.

No silent length cap (HF `Seq2SeqTrainer`'s default `max_length=20` truncates outputs without a word): the limit
is `--max-new-tokens` (default: the encoder–decoder's whole decoder context; 256 for decoders), and the report
counts the outputs that reached it (`truncated`) and warns when there are any.

Every prediction goes to `predictions.jsonl` (ref, source, reference, prediction, finish_reason per line) in the
model's folder or at `--predictions FILE`, written atomically after decoding; nothing is written on an error.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llmkit.config import FinetuneConfig, FinetuneRunConfig
from llmkit.data.pairs import Pair, load_pairs, sft_prompt
from llmkit.errors import ConfigError, DataError
from llmkit.files import atomic_write_text
from llmkit.infer.load import Loaded, load_model
from llmkit.text2text.metrics import text2text_scores

DECODER_MAX_NEW_TOKENS = 256  # a decoder's default answer length: twice the longest WEB verse in tokens


def predictions_path(model: str | Path, predictions: str | Path | None) -> Path:
    """Where the predictions go: `--predictions FILE`, else `<model folder>/predictions.jsonl`. A model that is
    not a folder (a built-in name, a .gguf file) needs --predictions: checked before any decoding."""
    if predictions is not None:
        p = Path(predictions)
        if p.is_dir():
            raise ConfigError(f"--predictions {p}: is a folder; give a file path (e.g. {p / 'predictions.jsonl'})")
        return p
    if Path(model).is_dir():
        return Path(model) / "predictions.jsonl"
    raise ConfigError(f"--model {model} is not a folder to write predictions.jsonl into: give --predictions FILE")


def instruction_for(loaded: Loaded, given: str | None) -> str:
    """The SFT run's own instruction (prompts must match training's), else `given`, else SFT's default."""
    run = loaded.run
    if isinstance(run, FinetuneRunConfig) and run.finetune.task == "sft":
        if given is not None and given != run.finetune.instruction:
            raise ConfigError(f"--instruction differs from the one {loaded.source} was trained with "
                              f"({run.finetune.instruction!r}); leave it out to use the run's own")
        return run.finetune.instruction
    return FinetuneConfig().instruction if given is None else given


def evaluate_text2text(model: str | Path, data: str, split: str = "test", beam: int = 1,
                       max_new_tokens: int | None = None, limit: int = 0, predictions: str | Path | None = None,
                       batch_size: int = 8, length_penalty: float = 1.0, instruction: str | None = None,
                       device: str = "cpu", dtype: str = "float32", quiet: bool = False) -> dict[str, Any]:
    """Decode `split` of the pair corpus `data` with `model`, score it (text2text_scores) and write the
    predictions. Returns the scores plus what was run (model, data, split, beam, max_new_tokens, truncated, ...)."""
    if beam < 1:
        raise ConfigError(f"--beam must be at least 1, got {beam}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if limit < 0:
        raise ConfigError(f"--limit must be 0 (every pair) or more, got {limit}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    out_path = predictions_path(model, predictions)
    pairs = load_pairs(data, split)
    if limit:
        pairs = pairs[:limit]
    if not pairs:
        raise DataError(f"{data} ({split}): no pairs to evaluate")
    loaded = load_model(model, device=device, dtype=dtype)
    t0 = time.perf_counter()
    if loaded.cfg.arch == "mbart":
        kind = "encoder-decoder"
        new = loaded.cfg.block_size if max_new_tokens is None else max_new_tokens
        texts, finish = _encoder_decoder(loaded, pairs, new, beam, length_penalty, batch_size, quiet)
        used_instruction = None
    elif loaded.cfg.arch == "bert" or (loaded.run is not None and loaded.run.train.objective == "classify"):
        raise ConfigError(f"{model}: an encoder or a classifier does not write text; text2text needs an "
                          "encoder–decoder (llmkit finetune --task text2text) or a decoder (e.g. --task sft)")
    else:
        if beam > 1:
            raise ConfigError(f"--beam {beam}: beam search is for encoder–decoders; a decoder ({loaded.cfg.arch}) "
                              "decodes greedily here (--beam 1)")
        kind = "decoder"
        new = DECODER_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        used_instruction = instruction_for(loaded, instruction)
        texts, finish = _decoder(loaded, pairs, used_instruction, new, batch_size, quiet)
    seconds = time.perf_counter() - t0
    scores = text2text_scores(texts, [p.target for p in pairs])
    truncated = sum(f == "length" for f in finish)
    rows = [{"ref": p.ref, "source": p.source, "reference": p.target, "prediction": t, "finish_reason": f}
            for p, t, f in zip(pairs, texts, finish)]
    atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if truncated and not quiet:
        print(f"warning: {truncated} of {len(pairs)} outputs reached --max-new-tokens {new} before ending "
              "(they may be cut; raise --max-new-tokens)", file=sys.stderr)
    return {**scores, "model": str(model), "kind": kind, "data": str(data), "split": split, "beam": beam,
            "length_penalty": length_penalty if beam > 1 else None, "max_new_tokens": new, "truncated": truncated,
            "instruction": used_instruction, "predictions": str(out_path), "decode_seconds": round(seconds, 3)}


def _encoder_decoder(loaded: Loaded, pairs: list[Pair], max_new_tokens: int, beam: int, length_penalty: float,
                     batch_size: int, quiet: bool) -> tuple[list[str], list[str]]:
    from llmkit.infer.seq2seq import seq2seq_decode

    found = seq2seq_decode(loaded.model, loaded.tokenizer, [p.source for p in pairs], max_new_tokens=max_new_tokens,
                           beam=beam, length_penalty=length_penalty, batch_size=batch_size, progress=not quiet)
    return [g.text.strip() for g in found], [g.finish_reason for g in found]


def _decoder(loaded: Loaded, pairs: list[Pair], instruction: str, max_new_tokens: int, batch_size: int,
             quiet: bool) -> tuple[list[str], list[str]]:
    """Greedy answers to the SFT prompt, in left-padded batches of similar length (a padded row computes what it
    would alone, infer/generate.py)."""
    from llmkit.data.tokenizer import end_of_turn_ids
    from llmkit.infer.generate import SamplingConfig, generate

    tok = loaded.tokenizer
    prompts = [tok.encode_prompt(sft_prompt(tok, p.source, instruction)) for p in pairs]
    ctx = loaded.cfg.block_size
    for i, ids in enumerate(prompts):
        if len(ids) + max_new_tokens > ctx:
            raise DataError(f"pair {i} ({pairs[i].ref}): a prompt of {len(ids)} tokens + --max-new-tokens "
                            f"{max_new_tokens} exceeds the model's context of {ctx} tokens")
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    eos = set(end_of_turn_ids(tok))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts, finish = [""] * len(prompts), [""] * len(prompts)
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for rows in tqdm(batches, desc="generating", unit="batch", disable=quiet):
        for i, g in zip(rows, generate(loaded.model, tok, [prompts[i] for i in rows], cfg, eos_ids=eos)):
            texts[i], finish[i] = g.text.strip(), g.finish_reason
    return texts, finish
