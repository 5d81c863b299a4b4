"""The logit lens (nostalgebraist 2020): read every layer's residual stream with the model's own output head, to see
at which depth the prediction forms.

Decoders: hidden state -> the final norm -> `lm_head`, exactly the modules the model's forward ends with, so the
last layer's lens IS the model's logits (no `fold_ln` / `center_unembed` corrections that make other tools'
numbers differ from the model's). Encoders with a trained masked-LM head: the MLM head at every position (what
token the layer thinks sits there). Fine-tuned classifiers: each layer's state pooled as the classifier pools it,
then its head: class probabilities per layer, one "position". A bare encoder (all-MiniLM: its checkpoint has no
MLM head, the loader fills one with random numbers) has nothing honest to read the stream with: a ConfigError.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llmkit.errors import ConfigError
from llmkit.explain.capture import Capture, Subject, display_token
from llmkit.model.encoder import last_token_pool, mean_pool

CHUNK = 256  # positions per head projection: a (CHUNK, V) block instead of (T, V) keeps 1,000-token inputs small


def supports_lens(subject: Subject) -> bool:
    return subject.kind != "encoder" or subject.has_mlm_head


def lens_logits(subject: Subject, hidden: Tensor) -> Tensor:
    """One layer's residual stream (P, C) -> logits through the model's own head: decoders (P, Vpad), MLM
    encoders (P, Vpad), classifiers (1, K) for the pooled text."""
    m = subject.backbone
    if subject.classifier is not None:
        clf = subject.classifier
        h = hidden.unsqueeze(0)  # (1, T, C)
        # Pooled as Classifier.forward pools the last layer (the test checks the last layer gives its logits).
        if clf.encoder:
            pooled = torch.tanh(m.pooler(h[:, 0])) if clf.pooling == "cls" else mean_pool(h, None)  # (1, C)
        else:
            h = m.norm(h)  # (1, T, C) the decoder's final norm, as its `hidden` output has
            pooled = (mean_pool if clf.pooling == "mean" else last_token_pool)(h, None)  # (1, C)
        return clf.classifier(pooled)  # (1, K)
    if subject.kind == "decoder":
        return m.lm_head(m.norm(hidden))  # (P, Vpad)
    if subject.has_mlm_head:
        return m.mlm(hidden)  # (P, Vpad) post-norm blocks: the stream is already normalised
    raise ConfigError(f"method 'logit-lens' needs an output head, and {subject.name} is a bare encoder (its "
                      "checkpoint has no masked-LM head); use attention, rollout, or a fine-tuned classifier")


@torch.no_grad()
def logit_lens(subject: Subject, cap: Capture, target_index: int | None, top_k: int) -> list[list[dict[str, Any]]]:
    """Layers 0..n_layer (0 = embeddings) x positions of {"token", "id", "prob", "top", "target_rank"}.

    target_rank is the rank (0 = top) of what the position should predict: the next input token (decoders; the
    target at the last position), the input token itself (MLM encoders), the target class (classifiers)."""
    names: dict[int, str] = {}

    def name(i: int) -> str:
        if i not in names:
            names[i] = subject.labels[i] if subject.labels is not None else display_token(subject.tokenizer, i)
        return names[i]

    ids = cap.ids
    if subject.classifier is not None:
        wanted = torch.tensor([target_index if target_index is not None else -1])  # (1,)
    elif subject.kind == "decoder":
        last = torch.tensor([target_index if target_index is not None else -1], device=ids.device)
        wanted = torch.cat([ids[1:], last])  # (T,) the token each position should predict
    else:
        wanted = ids  # (T,) an MLM head reconstructs the token at its own position
    V = len(subject.labels) if subject.labels is not None else subject.cfg.vocab_size
    k = min(top_k, V)
    table = []
    for h in cap.hidden_states:
        rows: list[dict[str, Any]] = []
        for s in range(0, h.shape[0], CHUNK):
            logits = lens_logits(subject, h[s:s + CHUNK])[:, :V].float()  # (P, V) real vocabulary only
            probs = torch.softmax(logits, dim=-1)  # (P, V)
            top_p, top_i = probs.topk(k, dim=-1)  # (P, k)
            w = wanted[s:s + logits.shape[0]].to(logits.device)  # (P,)
            w_logit = logits.gather(1, w.clamp(min=0)[:, None])  # (P, 1)
            ranks = (logits > w_logit).sum(-1)  # (P,) how many outrank the wanted token
            for p in range(logits.shape[0]):
                tp, ti = top_p[p].tolist(), top_i[p].tolist()
                rows.append({"token": name(ti[0]), "id": ti[0], "prob": tp[0],
                             "top": [[name(i), q] for i, q in zip(ti, tp)],
                             "target_rank": int(ranks[p]) if int(w[p]) >= 0 else None})
        table.append(rows)
    return table


def first_layer_on_top(table: list[list[dict[str, Any]]], target_index: int | None) -> int | None:
    """The first layer whose top prediction at the last position is the target (None if no layer gets there)."""
    if target_index is None:
        return None
    return next((li for li, rows in enumerate(table) if rows[-1]["id"] == target_index), None)
