"""`explain()`: run the chosen methods on one text and gather their numbers into one JSON-ready dict."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmkit.errors import ConfigError
from llmkit.explain.attention import head_summaries, rollout
from llmkit.explain.attribution import integrated_gradients, saliency
from llmkit.explain.capture import Capture, Subject, capture, display_token, load_subject, tokenize
from llmkit.explain.lens import first_layer_on_top, logit_lens, supports_lens

METHODS = ("attention", "rollout", "logit-lens", "saliency", "integrated-gradients")
DEFAULT_METHODS = METHODS  # for help texts; `methods=None` means every method the model supports
SIG_DIGITS = 6


# What each kind of model can be asked: a bare encoder predicts nothing, so it has no lens (unless its checkpoint
# carries a masked-LM head) and no target to attribute.
NEEDS_TARGET = ("saliency", "integrated-gradients")



MAX_WEIGHTS = 3_000_000  # attention values kept in report.json at most (~25 MB of JSON)

def explain(model: str | Path, text: str, methods: Sequence[str] | None = None, target: str | None = None,
            label: str | None = None, layer: int | None = None, head: int | None = None, ig_steps: int = 32,
            top_k: int = 5, device: str = "cpu", max_attention_tokens: int = 256) -> dict[str, Any]:
    """Explain how `model` reads `text`. One forward pass with attention weights and hidden states feeds
    attention, rollout and the logit lens; saliency and integrated gradients add backward passes.

    `methods` (names from METHODS, or one comma-separated string) defaults to None = every method the model
    supports (a bare encoder has no output head: no logit lens, no attributions); asking for an unsupported one
    is a ConfigError. `target` (decoders) is the next token to explain, exactly one token of the tokenizer
    (default: the model's top next token); `label` (classifiers) the class (default: the predicted one).
    `layer` / `head` are checked against the model and echoed in `focus`: where figures and the page start.

    Returns (floats rounded to 6 significant digits; keys of methods not run are None):
      model: str, arch: "gpt2"|"llama"|"bert", kind: "decoder"|"encoder"|"classifier", text: str,
      methods: [str] run, in METHODS order,
      tokens: [str] each input token decoded on its own (" the", not "Ġthe"; WordPiece keeps "##ing"),
      token_ids: [int], n_layer: int, n_head: int, focus: {"layer": int|None, "head": int|None},
      target: {"kind": "next_token", "token": str, "id": int, "probability": float}
            | {"kind": "class", "label": str, "index": int, "probability": float}
            | None (a bare encoder predicts nothing),
      attention: {"layers": L x H x T x T nested lists, or None when T > max_attention_tokens or L*H*T*T > MAX_WEIGHTS,
                  "heads": [{"layer", "head", "entropy", "mean_distance", "first_token"}] for every head,
                  "truncated": bool (True when "layers" was left out for length),
                  "max_tokens": max_attention_tokens},
      rollout: T x T nested lists (row i = how much token i draws on each input token through all layers), or
               None when T > max_attention_tokens,
      logit_lens: [layer 0..n_layer (0 = embeddings)] of [position] of
                  {"token": str, "id": int, "prob": float, "top": [[token, prob], ... top_k],
                   "target_rank": int | None} -- target_rank: rank (0 = top) of the next input token, and of the
                  target at the last position. Classifiers: one position (the pooled text), tokens are labels,
                  target_rank is the target class's rank. MLM encoders: rank of the input token itself.
      lens_layer_of_target: int | None, the first layer whose top token at the last position is the target,
      attributions: {"saliency": [T floats] | None, "integrated_gradients": [T floats] | None,
                     "ig_delta": float | None, "ig_steps": int, "ig_batch": int | None, "f_x": float,
                     "f_baseline": float | None} -- f = log-probability of the target; per-token sums over the
                    embedding dimension; None when neither attribution ran,
      timings: {"load", "forward", and each method run: seconds},
    and `_arrays` (not JSON: pop it before dumping), for the figures, whatever the length cap:
      {"attentions": [L numpy (H, T, T) float32] | None, "rollout": numpy (T, T) float64 | None}.
    """
    t0 = time.perf_counter()
    subject = load_subject(model, device)
    timings: dict[str, float] = {"load": time.perf_counter() - t0}
    chosen = _choose_methods(subject, methods)
    _check_focus(subject, layer, head)
    ids = tokenize(subject, text)
    t0 = time.perf_counter()
    cap = capture(subject, ids)
    timings["forward"] = time.perf_counter() - t0
    tgt = _resolve_target(subject, cap, target, label)
    target_index = None if tgt is None else tgt.get("id", tgt.get("index"))
    # The matrices grow as L x H x T^2: SmolLM2's 270 heads at 256 tokens would put 17.7 M numbers (over 100 MB)
    # into report.json, so the cap counts weights as well as tokens.
    fits = len(ids) <= max_attention_tokens and subject.cfg.n_layer * subject.cfg.n_head * len(ids) ** 2 <= MAX_WEIGHTS
    report: dict[str, Any] = {
        "model": str(model), "arch": subject.cfg.arch, "kind": subject.kind, "text": text, "methods": chosen,
        "tokens": cap.tokens, "token_ids": list(ids), "n_layer": subject.cfg.n_layer, "n_head": subject.cfg.n_head,
        "focus": {"layer": layer, "head": head}, "target": tgt, "attention": None, "rollout": None,
        "logit_lens": None, "lens_layer_of_target": None, "attributions": None, "timings": timings}
    arrays: dict[str, Any] = {"attentions": None, "rollout": None}

    def timed(name: str) -> _Timer:
        return _Timer(timings, name)

    if "attention" in chosen:
        with timed("attention"):
            arrays["attentions"] = [a.cpu().numpy() for a in cap.attentions]  # views, no copy
            report["attention"] = {"layers": [_sig(a) for a in arrays["attentions"]] if fits else None,
                                   "heads": head_summaries(cap.attentions), "truncated": not fits,
                                   "max_tokens": max_attention_tokens, "max_weights": MAX_WEIGHTS}
    if "rollout" in chosen:
        with timed("rollout"):
            arrays["rollout"] = rollout(cap.attentions).cpu().numpy()  # (T, T)
            report["rollout"] = _sig(arrays["rollout"]) if fits else None
    if "logit-lens" in chosen:
        with timed("logit-lens"):
            report["logit_lens"] = logit_lens(subject, cap, target_index, top_k)
            report["lens_layer_of_target"] = first_layer_on_top(report["logit_lens"], target_index)
    if target_index is not None and any(m in chosen for m in NEEDS_TARGET):
        x = cap.ids[None]  # (1, T)
        # f(x), the target's log-probability, from the capture's forward pass (the one every method reads).
        f_x = float(torch.log_softmax(_real(subject, cap.logits), -1)[target_index])
        attr: dict[str, Any] = {"saliency": None, "integrated_gradients": None, "ig_delta": None,
                                "ig_steps": ig_steps, "ig_batch": None, "f_x": f_x, "f_baseline": None}
        if "saliency" in chosen:
            with timed("saliency"):
                attr["saliency"] = saliency(subject, x, target_index)
        if "integrated-gradients" in chosen:
            with timed("integrated-gradients"):
                attr.update(integrated_gradients(subject, x, target_index, ig_steps))
        report["attributions"] = attr
    del cap
    out = _rounded(report)
    out["_arrays"] = arrays
    return out


class _Timer:
    """`with _Timer(timings, name):` adds the block's wall time to timings[name]."""

    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = time.perf_counter() - self.t0


def supported_methods(subject: Subject) -> tuple[str, ...]:
    """The methods this model can answer, in METHODS order."""
    return tuple(m for m in METHODS if not (
        (m == "logit-lens" and not supports_lens(subject)) or (m in NEEDS_TARGET and subject.kind == "encoder")))


def _choose_methods(subject: Subject, methods: Sequence[str] | str | None) -> list[str]:
    can = supported_methods(subject)
    if methods is None:
        return list(can)
    asked = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    if not asked:
        raise ConfigError(f"--methods is empty; choose from {', '.join(METHODS)}")
    for m in asked:
        if m not in METHODS:
            raise ConfigError(f"--methods: unknown method {m!r}; valid: {', '.join(METHODS)}")
        if m not in can:
            why = ("its checkpoint has no masked-LM head to read layers with" if m == "logit-lens"
                   else "it predicts nothing to attribute (fine-tune a classifier for that)")
            raise ConfigError(f"--methods: {subject.name} is a bare {subject.cfg.arch} encoder and cannot do {m!r}: "
                              f"{why}; it supports {', '.join(can)}")
    return [m for m in METHODS if m in asked]


def _check_focus(subject: Subject, layer: int | None, head: int | None) -> None:
    L, H = subject.cfg.n_layer, subject.cfg.n_head
    if layer is not None and not 0 <= layer < L:
        raise ConfigError(f"--layer {layer} is out of range: {subject.name} has layers 0..{L - 1}")
    if head is not None and not 0 <= head < H:
        raise ConfigError(f"--head {head} is out of range: {subject.name} has heads 0..{H - 1} in each layer")


def _real(subject: Subject, logits: Tensor) -> Tensor:
    """Logits over real tokens or classes only (a decoder's head has padding rows past the vocabulary)."""
    return logits if subject.labels is not None else logits[: subject.cfg.vocab_size]


def _resolve_target(subject: Subject, cap: Capture, target: str | None, label: str | None) -> dict[str, Any] | None:
    """The prediction to explain: --target / --label if given (checked), else the model's own top choice."""
    if target is not None and subject.kind != "decoder":
        raise ConfigError(f"--target needs a decoder (it names the next token); {subject.name} is a "
                          f"{subject.kind}" + ("; use --label" if subject.kind == "classifier" else ""))
    if label is not None and subject.kind != "classifier":
        raise ConfigError(f"--label needs a fine-tuned classifier; {subject.name} is a {subject.kind}"
                          + ("; use --target TOKEN" if subject.kind == "decoder" else ""))
    if cap.logits is None:
        return None
    probs = torch.softmax(_real(subject, cap.logits), dim=-1)  # (V,) or (K,)
    if subject.labels is not None:
        if label is not None and label not in subject.labels:
            raise ConfigError(f"--label {label!r} is not a class of {subject.name}; its labels: "
                              f"{', '.join(subject.labels)}")
        k = subject.labels.index(label) if label is not None else int(probs.argmax())
        return {"kind": "class", "label": subject.labels[k], "index": k, "probability": float(probs[k])}
    if target is not None:
        pieces = subject.tokenizer.encode(target)
        if len(pieces) != 1:
            shown = ", ".join(repr(display_token(subject.tokenizer, i)) for i in pieces) or "nothing"
            raise ConfigError(f"--target {target!r} is {len(pieces)} tokens for this tokenizer ({shown}); "
                              "give exactly one token" + (f", e.g. {display_token(subject.tokenizer, pieces[0])!r}"
                                                          if pieces else ""))
        i = pieces[0]
    else:
        i = int(probs.argmax())
    return {"kind": "next_token", "token": display_token(subject.tokenizer, i), "id": i,
            "probability": float(probs[i])}


def _sig(a: np.ndarray) -> list[Any]:
    """An array as nested lists rounded to 6 significant digits, vectorised (attention maps are millions of
    numbers; rounding them one by one in Python would take seconds)."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.floor(np.log10(np.abs(a)))
    mag[~np.isfinite(mag)] = 0
    scale = 10.0 ** (SIG_DIGITS - 1 - mag)
    return (np.round(a * scale) / scale).tolist()


def _rounded(obj: Any) -> Any:
    """Every float in a nested structure rounded to 6 significant digits (numbers a person reads, and JSON
    a fraction of the size)."""
    if isinstance(obj, float):
        return float(f"{obj:.{SIG_DIGITS}g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj
