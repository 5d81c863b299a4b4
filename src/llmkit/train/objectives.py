"""Training objectives: what a batch means and which loss it gives. Each plugs into the one loop in train/loop.py.

An objective is a callable `(model, batch) -> (loss, metrics)`; `metrics` holds extra scalar tensors to
average and log beside the loss (e.g. masked-token accuracy). New objectives register in `OBJECTIVES`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.data.tokenizer import Tokenizer
from llmkit.data.wordpiece import special_ids
from llmkit.errors import ConfigError
from llmkit.model.seq2seq import decoder_start_id, shift_right


class Objective(Protocol):
    name: str

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]: ...


class CausalLM:
    """Next-token prediction: batch has input_ids (B, T) and labels (B, T) shifted by one; -100 is ignored."""

    name = "causal_lm"

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        # The model fuses its output head with the loss (model/loss.py): no (B, T, V) logits are kept.
        return model(batch["input_ids"], labels=batch["labels"]).loss, {}


class MaskedLM:
    """BERT's masked LM on windows of running text, optionally with next-sentence prediction (`mlm+nsp`).

    Batch: input_ids (B, T) token windows (labels, if present, are ignored). Each window becomes
    `[CLS] text [SEP]` (or `[CLS] A [SEP] B [SEP]` for NSP, where half the B segments are swapped for another
    row's: a random text). 15 % of the non-special tokens are chosen; of those 80 % become [MASK], 10 % a
    random token, 10 % stay, and the model predicts the originals. Masking happens here, freshly every step
    (RoBERTa's dynamic masking), from the global RNG that checkpoints save, so a resumed run masks the same way.
    In eval mode the masks are seeded by the batch itself: every evaluation scores the same masked tokens, so
    validation losses are comparable (and early stopping is not fooled by mask noise).
    """

    name = "mlm"
    needs_tokenizer = True

    def __init__(self, tokenizer: Tokenizer, nsp: bool = False, mask_prob: float = 0.15) -> None:
        ids = special_ids(tokenizer)
        self.cls, self.sep, self.mask_id = ids["cls"], ids["sep"], ids["mask"]
        self.special = sorted(ids.values())
        self.vocab_size = tokenizer.vocab_size
        self.nsp, self.mask_prob = nsp, mask_prob
        self.name = "mlm+nsp" if nsp else "mlm"

    def frame(self, x: Tensor, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(B, T) windows -> input_ids (B, T), token_type_ids (B, T), NSP labels (B,) (1 = random B) or None."""
        B, T = x.shape
        cls = torch.full((B, 1), self.cls, dtype=x.dtype, device=x.device)
        sep = torch.full((B, 1), self.sep, dtype=x.dtype, device=x.device)
        if not self.nsp:
            ids = torch.cat([cls, x[:, : T - 2], sep], dim=1)  # (B, T)
            return ids, torch.zeros_like(ids), None
        body = T - 3
        cut = int(torch.randint(max(1, body // 4), max(2, 3 * body // 4 + 1), (), generator=gen, device=x.device))
        a, b = x[:, :cut], x[:, cut:body]
        is_random = torch.rand(B, device=x.device, generator=gen) < 0.5  # (B,)
        b = torch.where(is_random[:, None], b.roll(1, dims=0), b)  # another row's continuation
        ids = torch.cat([cls, a, sep, b, sep], dim=1)  # (B, T)
        types = torch.zeros_like(ids)
        types[:, cut + 2:] = 1
        return ids, types, is_random.long()

    def mask(self, ids: Tensor, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """-> corrupted input_ids (B, T) and the chosen positions (B, T) bool."""
        special = torch.isin(ids, torch.tensor(self.special, device=ids.device))
        chosen = (torch.rand(ids.shape, device=ids.device, generator=gen) < self.mask_prob) & ~special
        if not chosen.any():  # a batch must predict something
            chosen[0, 1] = True
        roll = torch.rand(ids.shape, device=ids.device, generator=gen)
        out = torch.where(chosen & (roll < 0.8), torch.full_like(ids, self.mask_id), ids)
        randoms = torch.randint(self.vocab_size, ids.shape, device=ids.device, generator=gen)
        out = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), randoms, out)
        return out, chosen

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, gen = batch["input_ids"], None
        if not model.training:  # fixed masks for evaluation, seeded by the batch's content
            gen = torch.Generator(device=x.device).manual_seed(int(x[:, :64].sum()) % (2**31))
        ids, types, nsp_labels = self.frame(x, gen)
        corrupted, chosen = self.mask(ids, gen)
        out = model(corrupted, token_type_ids=types, mlm_positions=chosen)
        targets = ids[chosen]  # (N,)
        mlm_loss = F.cross_entropy(out.logits.float(), targets)
        metrics = {"masked_accuracy": (out.logits.argmax(-1) == targets).float().mean()}
        if nsp_labels is None:
            return mlm_loss, metrics
        nsp_loss = F.cross_entropy(out.nsp_logits.float(), nsp_labels)
        metrics.update(mlm_loss=mlm_loss.detach(), nsp_loss=nsp_loss.detach(),
                       nsp_accuracy=(out.nsp_logits.argmax(-1) == nsp_labels).float().mean())
        return mlm_loss + nsp_loss, metrics


class MaskedLMNSP(MaskedLM):
    name = "mlm+nsp"

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer, nsp=True)


class Classify:
    """Sequence classification: batch has input_ids (B, T), attention_mask (B, T) and labels (B,) class ids.

    The model (a `classify.Classifier`) pools each text to one vector and returns (B, K) class logits."""

    name = "classify"

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch["input_ids"], attention_mask_2d=batch["attention_mask"]).logits  # (B, K)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        return loss, {"accuracy": (logits.argmax(-1) == batch["labels"]).float().mean()}


class Seq2Seq:
    """An encoder–decoder's teacher-forced cross-entropy: batch has input_ids (B, S) + attention_mask (B, S) (the
    source, right-padded) and labels (B, T) (the target + eos, -100 on padding).

    Teacher forcing: the decoder reads the true target shifted right behind the start token (`shift_right`), never
    its own guesses, so one forward scores every target position. Label smoothing (training only) spreads
    `label_smoothing` of each target's probability over the vocabulary; evaluation reports the plain
    cross-entropy, comparable across runs whatever their smoothing. Padded source tokens are masked out of every
    attention by attention_mask; padded labels (-100) are out of the loss."""

    name = "seq2seq"
    needs_tokenizer = True

    def __init__(self, tokenizer: Tokenizer, label_smoothing: float = 0.0) -> None:
        self.start_id, self.pad_id = decoder_start_id(tokenizer), tokenizer.pad_id
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        labels = batch["labels"]  # (B, T)
        decoder_input_ids = shift_right(labels, self.start_id, self.pad_id)  # (B, T)
        smoothing = self.label_smoothing if model.training else 0.0
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_input_ids,
                    labels=labels, label_smoothing=smoothing)
        return out.loss, {}


OBJECTIVES: dict[str, type] = {"causal_lm": CausalLM, "mlm": MaskedLM, "mlm+nsp": MaskedLMNSP, "classify": Classify,
                               "seq2seq": Seq2Seq}


def get_objective(name: str, tokenizer: Tokenizer | None = None) -> Objective:
    """The objective called `name`; those that need special token ids (masked LM) get them from `tokenizer`."""
    if name not in OBJECTIVES:
        raise ConfigError(f"train.objective: unknown objective {name!r} (valid: {', '.join(OBJECTIVES)})")
    cls = OBJECTIVES[name]
    if getattr(cls, "needs_tokenizer", False):
        if tokenizer is None:
            raise ConfigError(f"train.objective {name!r} needs the tokenizer's special tokens")
        return cls(tokenizer)
    return cls()
