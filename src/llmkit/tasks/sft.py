"""`llmkit finetune --task sft`: supervised fine-tuning of a decoder on source -> target pairs, in the one loop.

Each pair becomes one chat: the user turn is `finetune.instruction`, a blank line and the source, rendered by the
model's own chat template with the assistant's turn opened (`data.pairs.sft_prompt`, the same function
`llmkit eval --task text2text` prompts with); the answer is the target followed by the tokenizer's end token,
where generation stops. The loss is on the answer tokens only: the prompt's labels are -100, so the model is not
trained to write instructions or verses in Early Modern English, only to answer them.

Prompt and answer are tokenised separately, as at inference (the prompt is encoded alone, the answer generated
after it), so training sees exactly the token boundary generation will. Rows are padded per length-grouped
batch, not packed (data/pair_batches.py says why). LoRA (`--lora`) puts peft adapters on the attention and MLP
matrices (tasks/finetune.py `add_lora`); the run folder keeps the adapter alone in adapter/ and the merged weights
in model.safetensors, so it is a plain decoder run folder every verb loads (generate, chat, eval, convert).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmkit.config import FinetuneRunConfig
from llmkit.data.pair_batches import IGNORE_INDEX
from llmkit.data.pairs import sft_prompt
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import CheckpointError, ConfigError
from llmkit.infer.load import load_model
from llmkit.model.weights import load_into, load_weights
from llmkit.tasks.finetune import add_lora, write_classifier_folder
from llmkit.tasks.pair_tasks import keep_fitting, pair_splits, start_pair_run, steps_for, summary
from llmkit.train.loop import train
from llmkit.train.objectives import CausalLM


def sft_example(tok: Tokenizer, source: str, target: str, instruction: str) -> tuple[list[int], list[int]]:
    """One SFT row as (input ids, labels), labels already shifted by one (label t is token t + 1) and -100 on
    every position whose next token is still the prompt."""
    prompt = tok.encode_prompt(sft_prompt(tok, source, instruction))
    answer = [*tok.encode(target), tok.eos_id]
    row = prompt + answer
    return row[:-1], [IGNORE_INDEX] * (len(prompt) - 1) + answer


def load_decoder(base: str, seed: int) -> Any:
    """The decoder to fine-tune; an encoder, encoder–decoder or classifier is a one-line error."""
    try:
        loaded = load_model(base, seed=seed, need="decoder")
    except CheckpointError as e:
        raise ConfigError(f"--model {e}") from None
    if loaded.cfg.arch in ("bert", "mbart"):
        raise ConfigError(f"--model {base}: --task sft trains a decoder (gpt2 or llama), not a {loaded.cfg.arch} "
                          "model (an encoder–decoder trains with --task text2text)")
    return loaded


def sft(cfg: FinetuneRunConfig, out_dir: str | Path, resume: bool = False, quiet: bool = False,
        overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune the decoder cfg.finetune.base on cfg.data.path's pairs into `out_dir`; returns the summary. Every
    check happens before the first write."""
    ft, out = cfg.finetune, Path(out_dir)
    splits = pair_splits(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    loaded = load_decoder(ft.base, cfg.train.seed)
    cfg.model, tok = loaded.cfg, loaded.tokenizer
    limit = min(ft.max_length, cfg.model.block_size)
    rows = {s: keep_fitting([sft_example(tok, p.source, p.target, ft.instruction) for p in ps], limit, s, quiet,
                            "prompt + answer") for s, ps in splits.items()}
    steps_for(cfg, len(rows["train"]))
    torch.manual_seed(cfg.train.seed)
    plain: nn.Module = loaded.model
    model = add_lora(plain, cfg) if ft.lora else plain
    B = cfg.data.batch_size
    batches, val = start_pair_run(cfg, tok, rows, "causal", out, resume, overwrite)
    mean_len = sum(len(a) for a, _ in rows["train"]) / len(rows["train"])
    answer_share = sum(sum(t != IGNORE_INDEX for t in y) for _, y in rows["train"]) / (mean_len * len(rows["train"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not quiet:
        print(f"sft: {ft.base} ({cfg.model.arch}, {plain.num_params() / 1e6:.1f} M parameters, "
              f"{trainable / 1e6:.2f} M trainable{' via LoRA' if ft.lora else ''}); {len(rows['train']):,} train / "
              f"{len(rows['validation']):,} validation pairs of {cfg.data.path}, {mean_len:.0f} tokens per row "
              f"({answer_share:.0%} answer); {cfg.train.max_steps} steps")
    t0 = time.perf_counter()
    result = train(model, CausalLM(), cfg.train, batches, val, out, resume=resume,
                   tokens_per_batch=round(mean_len * B), flops_per_token=plain.flops_per_token(round(mean_len)),
                   quiet=quiet)
    seconds = time.perf_counter() - t0
    if ft.lora:  # the best evaluation's weights, adapters merged: a plain decoder run folder
        load_into(model, load_weights(out / "model.safetensors"), out / "model.safetensors")
        model.save_pretrained(str(out / "adapter"))  # type: ignore[operator]
        write_classifier_folder(model, cfg, tok, out)
    return summary(cfg, out, result, {"train_pairs": len(rows["train"]), "val_pairs": len(rows["validation"])},
                   seconds, lora=ft.lora, trainable_params=trainable)
