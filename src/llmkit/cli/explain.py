"""`llmkit explain`: attention maps, rollout, logit lens and attributions for one text, as report.json, PNGs and one
self-contained HTML page in an out folder (registered by cli/main.py).

The out folder is written whole or not at all (`llmkit.files.atomic_dir`): a bad --layer, a target the tokenizer
splits, a method the model cannot do all fail before anything is written, and a run killed half-way leaves the
previous output (or nothing). So that a typo in --out never replaces someone's files, the folder must be new,
empty, or an earlier `llmkit explain` output (it holds report.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from llmkit.cli.common import MODEL_HELP, int_at_least
from llmkit.errors import ConfigError, DataError

REPORT = "report.json"


def read_text(args: argparse.Namespace) -> str:
    """--text or --text-file (exactly one), as the string to explain."""
    if (args.text is None) == (args.text_file is None):
        raise ConfigError("give the text to explain with --text TEXT or --text-file FILE (one of them)")
    if args.text is not None:
        return args.text
    path = Path(args.text_file)
    if not path.is_file():
        raise DataError(f"--text-file {path}: no such file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"--text-file {path}: not UTF-8 text (byte {e.start})") from None


def check_out(out: Path) -> None:
    """Refuse an --out that is a file, or a folder holding anything but an earlier explain output."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder to write the report into")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT).is_file():
        raise ConfigError(f"--out {out} holds other files; give a new or empty folder, or an earlier "
                          "`llmkit explain` output (one with report.json) to replace")


def write_outputs(report: dict[str, Any], arrays: dict[str, Any], out: Path) -> dict[str, Any]:
    """report.json, the figures, index.html and bertviz.json, all in one atomic folder write; returns the
    paths as they will be once the folder is in place."""
    from llmkit.explain.attention import bertviz_json
    from llmkit.explain.figures import write_figures
    from llmkit.explain.page import write_page
    from llmkit.files import atomic_dir, atomic_write_text

    focus = report.get("focus") or {}
    with atomic_dir(out) as tmp:
        atomic_write_text(tmp / REPORT, json.dumps(report, ensure_ascii=False, allow_nan=False))
        figures = write_figures(report, arrays, tmp, focus.get("layer"), focus.get("head"))
        write_page(report, arrays, tmp / "index.html")
        files: dict[str, Any] = {"report": tmp / REPORT, "page": tmp / "index.html", **figures}
        layers = (report.get("attention") or {}).get("layers")
        if layers is not None:
            atomic_write_text(tmp / "bertviz.json", json.dumps(bertviz_json(layers, report["tokens"])))
            files["bertviz"] = tmp / "bertviz.json"

    def final(p: Path) -> str:
        return str(out / p.relative_to(tmp))

    return {k: [final(p) for p in v] if isinstance(v, list) else final(v) for k, v in files.items()}


def summary_lines(report: dict[str, Any], files: dict[str, Any], top: int = 5) -> list[str]:
    """The few facts a person wants first: what was predicted, where the lens finds it, which tokens drove it."""
    lines = [f"{report['model']}: {report['arch']} {report['kind']}, {len(report['tokens'])} tokens, "
             f"{report['n_layer']} layers x {report['n_head']} heads"]
    t = report.get("target")
    if t and t["kind"] == "next_token":
        lines.append(f"target: next token {t['token']!r} (p = {t['probability']:.4f})")
    elif t:
        lines.append(f"target: class {t['label']!r} (p = {t['probability']:.4f})")
    if report.get("logit_lens") is not None and t and t["kind"] == "next_token":
        at = report.get("lens_layer_of_target")
        lines.append(f"logit lens: {t['token']!r} is the top token from layer {at} of {report['n_layer']}"
                     if at is not None else f"logit lens: {t['token']!r} is never the top token at the last position")
    attr = report.get("attributions") or {}
    for key, name in (("integrated_gradients", "integrated gradients"), ("saliency", "gradient x input")):
        values = attr.get(key)
        if values:
            best = sorted(range(len(values)), key=lambda i: -values[i])[:top]
            shown = ", ".join(f"{report['tokens'][i]!r} {values[i]:+.3f}" for i in best)
            lines.append(f"top attributed tokens ({name}): {shown}")
            break
    if (report.get("attention") or {}).get("truncated"):
        att = report["attention"]
        lines.append(f"attention matrices left out of report.json and the page ({len(report['tokens'])} tokens, over "
                     f"the cap of {att['max_tokens']} tokens or {att.get('max_weights')} weights); the PNGs have "
                     "every layer")
    n = sum(len(v) if isinstance(v, list) else 1 for v in files.values())
    lines.append(f"wrote {n} files; open {files['page']} in a browser")
    return lines


def cmd_explain(args: argparse.Namespace) -> None:
    from llmkit.explain import explain

    text = read_text(args)
    out = Path(args.out)
    check_out(out)
    print(f"explain: loading {args.model} and running {args.methods or 'every supported method'}", file=sys.stderr)
    report = explain(args.model, text, methods=args.methods, target=args.target, label=args.label,
                     layer=args.layer, head=args.head, ig_steps=args.ig_steps, top_k=args.top_k,
                     device=args.device, max_attention_tokens=args.max_attention_tokens)
    arrays = report.pop("_arrays", None) or {}
    timings = report.get("timings") or {}
    for name in ["load", "forward", *report["methods"]]:
        if name in timings:
            print(f"explain: {name} {timings[name]:.2f} s", file=sys.stderr)
    t0 = time.perf_counter()
    files = write_outputs(report, arrays, out)
    print(f"explain: figures and page {time.perf_counter() - t0:.2f} s -> {out}", file=sys.stderr)
    if args.json:
        brief = {k: v for k, v in report.items() if k != "rollout"}
        if report.get("attention") is not None:  # the matrices are in report.json; stdout keeps what a script reads
            brief["attention"] = {k: v for k, v in report["attention"].items() if k != "layers"}
        print(json.dumps({**brief, "files": files}, ensure_ascii=False))
    else:
        print("\n".join(summary_lines(report, files)))


def register(sub: argparse._SubParsersAction) -> None:
    from llmkit.explain.report import METHODS

    p = sub.add_parser("explain", help="see inside a model: attention, rollout, logit lens, attributions",
                       description="Explain how a model reads one text: every layer x head's attention (PNG grid "
                       "per layer, per-head entropy / distance / first-token summaries, bertviz JSON), attention "
                       "rollout, the logit lens (each layer's top next token) and token attributions (gradient x "
                       "input, integrated gradients) for a next token or a class. Writes OUT/report.json, "
                       "OUT/index.html (one self-contained page: pick layer and head, hover tokens), "
                       "OUT/attention/layer_XX.png, OUT/rollout.png, OUT/logit_lens.png, OUT/attributions.png.")
    p.add_argument("--model", required=True, help=MODEL_HELP + "; a `llmkit finetune --task classify` run explains "
                   "its class")
    p.add_argument("--text", help="the text to explain")
    p.add_argument("--text-file", help="read the text to explain from this UTF-8 file instead of --text")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--target", help="decoders: the next token to explain, exactly one token of the model's "
                     "tokenizer, leading space included (e.g. ' Paris'); default: the model's top next token")
    who.add_argument("--label", help="classifiers: the class to explain (e.g. pos); default: the predicted class")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}; default: every method the "
                   "model supports (a bare encoder has no logit lens or attributions)")
    p.add_argument("--layer", type=int_at_least(0), help="draw only this layer's attention grid, and open the page "
                   "on it (0-based; checked against the model)")
    p.add_argument("--head", type=int_at_least(0), help="draw only this head in the attention grids, and open the "
                   "page on it (0-based; checked against the model)")
    p.add_argument("--ig-steps", type=int_at_least(1), default=32, help="integrated-gradients steps along the path "
                   "from the baseline (more = closer to completeness, linearly slower; default 32)")
    p.add_argument("--top-k", type=int_at_least(1), default=5, help="logit lens: tokens listed per cell (default 5)")
    p.add_argument("--max-attention-tokens", type=int_at_least(1), default=256, help="inputs longer than this keep "
                   "attention matrices and rollout out of report.json and the page (they grow as tokens squared); "
                   "the per-head summaries and PNGs are still written (default 256)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (weights stay float32: gradients need it)")
    p.add_argument("--out", required=True, help="folder to write: new, empty, or an earlier `llmkit explain` output "
                   "(replaced whole)")
    p.add_argument("--json", action="store_true", help="print one JSON object: the report without the attention "
                   "matrices and rollout (those are in report.json), plus `files`, the paths written")
    p.set_defaults(fn=cmd_explain)
