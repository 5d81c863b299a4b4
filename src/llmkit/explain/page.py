"""The explain report as one self-contained HTML page (DIR/index.html) that opens offline, from file://.

The template (page.html, beside this file) holds all CSS and JavaScript inline; the report is embedded in a
`<script type="application/json" id="report-data">` tag. Attention matrices and rollout travel as base64 float32
rather than nested JSON lists: at 30 layers x 9 heads x 100 x 100 tokens that is 11 MB instead of about 25, and
the browser decodes it in one call. Attention is embedded only when the report kept it (attention.truncated is
false) and L x H x T x T stays within PAGE_MAX_WEIGHTS, so the page stays a file a browser opens at once; past
that the page says so and shows the per-head summaries. Rollout (T x T) is embedded up to the same budget, even
for inputs over the report's cap, since `_arrays` has it.
"""

from __future__ import annotations

import base64
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.explain.figures import attention_array, rollout_array
from llmkit.files import atomic_write_text

PLACEHOLDER = "__REPORT_JSON__"
PAGE_MAX_WEIGHTS = 6_000_000  # attention values embedded at most: 24 MB as float32, 32 MB in base64
# Inside <script> the HTML parser ends the element at "</script"; "<!--" switches it to an odd state. Escaping
# "<", ">" and "&" as JSON \u escapes keeps the text valid JSON and inert HTML.
_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def _f32_base64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def page_data(report: dict[str, Any], arrays: dict[str, Any] | None) -> dict[str, Any]:
    """What the page embeds: the report without its nested matrices, which come back as `attention_f32` /
    `rollout_f32`. The page opens on the report's `focus` layer and head."""
    data = {k: v for k, v in report.items() if k not in ("_arrays", "rollout")}
    t = len(report["tokens"])
    att = None
    if report.get("attention") is not None:
        data["attention"] = {k: v for k, v in report["attention"].items() if k != "layers"}
        size = report["n_layer"] * report["n_head"] * t * t
        data["attention"]["page_cut"] = size > PAGE_MAX_WEIGHTS and not report["attention"].get("truncated")
        if not report["attention"].get("truncated") and size <= PAGE_MAX_WEIGHTS:
            att = attention_array(report, arrays)
    roll = rollout_array(report, arrays) if t * t <= PAGE_MAX_WEIGHTS else None
    data["attention_f32"] = None if att is None else _f32_base64(att)  # (L, H, T, T) flattened
    data["rollout_f32"] = None if roll is None else _f32_base64(roll)  # (T, T) flattened
    return data


def render_page(data: dict[str, Any]) -> str:
    template = files("llmkit.explain").joinpath("page.html").read_text(encoding="utf-8")
    payload = json.dumps(data, ensure_ascii=False, allow_nan=False).translate(_SCRIPT_SAFE)
    return template.replace(PLACEHOLDER, payload, 1)


def write_page(report: dict[str, Any], arrays: dict[str, Any] | None, path: Path) -> Path:
    """Write the page for `report` to `path` (atomically) and return it."""
    atomic_write_text(path, render_page(page_data(report, arrays)))
    return path
