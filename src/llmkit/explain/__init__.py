"""See inside a model: attention maps and per-head summaries, attention rollout, the logit lens and token
attributions (gradient x input, integrated gradients), all computed from the model's own forward pass.

`explain()` returns one JSON-ready report dict (schema in `report.explain`'s docstring); the figures, the HTML page
and `llmkit explain` are built from that dict alone, so every number a person sees is the one computed here.
"""

from llmkit.explain.report import DEFAULT_METHODS, METHODS, explain

__all__ = ["DEFAULT_METHODS", "METHODS", "explain"]
