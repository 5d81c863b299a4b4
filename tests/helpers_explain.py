"""A hand-made explain report with the schema of `llmkit.explain.report.explain`, for the figure and page tests:
they check what is drawn from a report, not how the report's numbers are computed (test_explain*.py do that)."""

from __future__ import annotations

from typing import Any

import numpy as np


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def fake_report(n_tokens: int = 6, n_layer: int = 2, n_head: int = 3, kind: str = "decoder", seed: int = 0,
                max_attention_tokens: int = 256) -> dict[str, Any]:
    """Causal attention with distinct, seeded weights per layer and head; every method's keys filled."""
    rng = np.random.default_rng(seed)
    t = n_tokens
    words = ["The", " capital", " of", " France", " is", " a", " city", "\n", " with", " many"]
    tokens = [words[i % len(words)] for i in range(t)]
    mask = np.tril(np.ones((t, t), dtype=bool)) if kind == "decoder" else np.ones((t, t), dtype=bool)
    logits = rng.normal(size=(n_layer, n_head, t, t)) * 2.0
    att = _softmax_rows(np.where(mask, logits, -np.inf)).astype(np.float32)  # (L, H, T, T)
    roll = _softmax_rows(np.where(mask, rng.normal(size=(t, t)), -np.inf)).astype(np.float32)  # (T, T)
    vocab = [" Paris", " London", " the", " a", " Rome"]
    truncated = t > max_attention_tokens

    def cell(layer: int, pos: int) -> dict[str, Any]:
        p = _softmax_rows(rng.normal(size=len(vocab)) * (1 + layer))
        order = np.argsort(-p)
        return {"token": vocab[order[0]], "id": int(order[0]), "prob": round(float(p[order[0]]), 6),
                "top": [[vocab[i], round(float(p[i]), 6)] for i in order[:3]], "target_rank": int(rng.integers(0, 5))}

    positions = 1 if kind == "classifier" else t
    lens = [[cell(layer, pos) for pos in range(positions)] for layer in range(n_layer + 1)]
    heads = [{"layer": layer, "head": h, "entropy": round(float(rng.uniform(0, 2)), 6),
              "mean_distance": round(float(rng.uniform(0, 3)), 6), "first_token": round(float(rng.uniform()), 6)}
             for layer in range(n_layer) for h in range(n_head)]
    sal = rng.normal(size=t).round(6).tolist()
    ig = rng.normal(size=t).round(6).tolist()
    target = ({"kind": "class", "label": "pos", "index": 1, "probability": 0.9} if kind == "classifier" else
              {"kind": "next_token", "token": " Paris", "id": 0, "probability": 0.4})
    return {
        "model": "fake", "arch": "llama", "kind": kind, "text": "".join(tokens),
        "methods": ["attention", "rollout", "logit-lens", "saliency", "integrated-gradients"],
        "tokens": tokens, "token_ids": list(range(t)), "n_layer": n_layer, "n_head": n_head,
        "focus": {"layer": None, "head": None}, "target": target,
        "attention": {"layers": None if truncated else att.round(6).tolist(), "heads": heads, "truncated": truncated,
                      "max_tokens": max_attention_tokens},
        "rollout": None if truncated else roll.round(6).tolist(),
        "logit_lens": lens, "lens_layer_of_target": 1,
        "attributions": {"saliency": sal, "integrated_gradients": ig, "ig_delta": 0.001, "ig_steps": 32,
                         "ig_batch": 32, "f_x": -0.9, "f_baseline": -5.2},
        "timings": {"load": 0.1, "forward": 0.01, "attention": 0.0, "rollout": 0.0, "logit-lens": 0.01,
                    "saliency": 0.02, "integrated-gradients": 0.2},
        "_arrays": {"attentions": list(att), "rollout": roll.astype(np.float64)},
    }
