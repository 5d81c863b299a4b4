"""The explain report as PNGs: one grid of heads per layer, the rollout map, the logit-lens table, the attributions.

Every picture is drawn from the report dict alone (plus its `_arrays`, the same numbers as numpy) and saved through
`llmkit.plots.save_figure`, so what a figure shows is what report.json holds. Long inputs stay readable: token
labels are thinned to at most `MAX_LABELS` per axis, the logit-lens table keeps the last `MAX_LENS_POSITIONS`
positions (where the target is predicted) and figure sizes are capped so a 1,000-token input still gives a PNG a
viewer opens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.plots import pyplot, save_figure

MAX_LABELS = 40  # token labels per axis; beyond this every k-th token is labelled
MAX_LENS_POSITIONS = 24  # logit-lens columns drawn (the last ones); report.json and the page keep them all
LABEL_CHARS = 12  # a token label longer than this is cut with an ellipsis


def token_label(tok: str) -> str:
    """A token as a person can read it on an axis: whitespace made visible, long tokens cut."""
    s = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in tok)  # "\n", "\x03"
    if s.startswith(" "):
        s = "_" + s[1:]
    if not s:
        s = "''"
    return s if len(s) <= LABEL_CHARS else s[: LABEL_CHARS - 1] + "…"


def _tick_positions(n: int) -> list[int]:
    """Which of n tokens get a label: all of them up to MAX_LABELS, else an even stride."""
    step = max(1, math.ceil(n / MAX_LABELS))
    return list(range(0, n, step))


def _label_axes(ax: Any, tokens: Sequence[str], x: bool = True, y: bool = True, size: float = 7) -> None:
    ticks = _tick_positions(len(tokens))
    labels = [token_label(tokens[i]) for i in ticks]
    if x:
        ax.set_xticks(ticks, labels, rotation=90, fontsize=size)
    else:
        ax.set_xticks([])
    if y:
        ax.set_yticks(ticks, labels, fontsize=size)
    else:
        ax.set_yticks([])


def attention_array(report: dict[str, Any], arrays: dict[str, Any] | None) -> np.ndarray | None:
    """The (L, H, T, T) attention weights: the float32 copy in `_arrays` (kept even over the page's token cap),
    else the report's nested lists, else None when attention did not run."""
    if arrays and arrays.get("attentions") is not None:
        return np.asarray(arrays["attentions"], dtype=np.float32)  # (L, H, T, T)
    att = report.get("attention") or {}
    if att.get("layers") is None:
        return None
    return np.asarray(att["layers"], dtype=np.float32)  # (L, H, T, T)


def rollout_array(report: dict[str, Any], arrays: dict[str, Any] | None) -> np.ndarray | None:
    if arrays and arrays.get("rollout") is not None:
        return np.asarray(arrays["rollout"], dtype=np.float32)  # (T, T)
    return None if report.get("rollout") is None else np.asarray(report["rollout"], dtype=np.float32)  # (T, T)


def plot_attention_layer(att: np.ndarray, tokens: Sequence[str], layer: int, path: Path,
                         heads: Sequence[int] | None = None) -> None:
    """One PNG for one layer: a heatmap per head (rows: the token attending, columns: the token attended to)."""
    plt = pyplot()
    heads = list(range(att.shape[0])) if heads is None else list(heads)
    ncol = math.ceil(math.sqrt(len(heads)))
    nrow = math.ceil(len(heads) / ncol)
    t = att.shape[-1]
    panel = min(5.0, max(2.6, 0.13 * min(t, MAX_LABELS) + 1.2))  # inches: labels fit, a long input stays bounded
    fig = plt.figure(figsize=(panel * ncol + 1.0, panel * nrow + 0.6), dpi=100)
    grid = fig.add_gridspec(nrow, ncol + 1, width_ratios=[1.0] * ncol + [0.05])  # last column: the colour bar
    image = None
    for k in range(nrow * ncol):
        ax = fig.add_subplot(grid[k // ncol, k % ncol])
        if k >= len(heads):
            ax.axis("off")
            continue
        h = heads[k]
        image = ax.imshow(att[h], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
        ax.set_title(f"head {h}", fontsize=9)
        _label_axes(ax, tokens, x=k // ncol == nrow - 1 or k + ncol >= len(heads), y=k % ncol == 0)
    fig.colorbar(image, cax=fig.add_subplot(grid[:, -1]), label="attention weight")
    fig.suptitle(f"layer {layer}: query token (row) attends to key token (column)", fontsize=10)
    save_figure(fig, path)


def plot_rollout(roll: np.ndarray, tokens: Sequence[str], path: Path) -> None:
    """Attention rollout: how much each token (row) draws on each input token (column) through all layers."""
    plt = pyplot()
    side = min(9.0, max(4.0, 0.16 * min(len(tokens), MAX_LABELS) + 2.0))
    fig, ax = plt.subplots(figsize=(side + 1.2, side), dpi=100)
    image = ax.imshow(roll, cmap="magma", interpolation="nearest")
    _label_axes(ax, tokens)
    fig.colorbar(image, ax=ax, shrink=0.8, label="rolled-out attention")
    ax.set_title("attention rollout (residual included)", fontsize=10)
    save_figure(fig, path)


def plot_logit_lens(report: dict[str, Any], path: Path) -> None:
    """Layers x positions: each cell is the top next token read from that layer's residual stream, coloured by its
    probability. Only the last MAX_LENS_POSITIONS positions are drawn."""
    plt = pyplot()
    lens = report["logit_lens"]
    n_pos = len(lens[0])
    start = max(0, n_pos - MAX_LENS_POSITIONS)
    probs = np.array([[cell["prob"] for cell in row[start:]] for row in lens], dtype=np.float32)  # (L+1, P)
    n_rows, n_cols = probs.shape
    fig, ax = plt.subplots(figsize=(min(30.0, 0.95 * n_cols + 2.5), min(30.0, 0.32 * n_rows + 2.0)), dpi=100)
    ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    for i, row in enumerate(lens):
        for j, cell in enumerate(row[start:]):
            ax.text(j, i, token_label(cell["token"])[:9], ha="center", va="center", fontsize=6.5,
                    color="white" if cell["prob"] > 0.55 else "black")
    if report.get("kind") == "classifier":
        cols = ["pooled"]
    else:
        cols = [token_label(t) for t in report["tokens"][start:start + n_cols]]
    ax.set_xticks(range(n_cols), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(n_rows), ["emb"] + [str(i) for i in range(1, n_rows)], fontsize=7)
    ax.set_xlabel("input position (the cell predicts the token after it)" if cols != ["pooled"] else "")
    ax.set_ylabel("layer (emb = embeddings)")
    cut = f", last {n_cols} of {n_pos} positions" if start else ""
    ax.set_title(f"logit lens: top token per layer, colour = probability{cut}", fontsize=10)
    save_figure(fig, path)


def plot_attributions(report: dict[str, Any], path: Path) -> None:
    """Gradient x input and integrated gradients per token, one bar row each, for the report's target."""
    plt = pyplot()
    attr = report["attributions"]
    rows = [(name, attr.get(key)) for name, key in (("gradient x input", "saliency"),
                                                     ("integrated gradients", "integrated_gradients"))]
    rows = [(name, np.asarray(v, dtype=np.float32)) for name, v in rows if v is not None]
    tokens = report["tokens"]
    t = len(tokens)
    fig, axes = plt.subplots(len(rows), 1, figsize=(min(24.0, max(6.0, 0.22 * min(t, 120) + 2)), 2.6 * len(rows)),
                             dpi=100, squeeze=False)
    for ax, (name, values) in zip(axes[:, 0], rows):
        colours = np.where(values >= 0, "#2b7bba", "#d6604d")
        ax.bar(range(t), values, color=colours, width=0.85)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_ylabel(name, fontsize=8)
        ax.set_xlim(-0.6, t - 0.4)
        _label_axes(ax, tokens, y=False)
        ax.tick_params(axis="y", labelsize=7)
        ax.yaxis.set_major_locator(plt.MaxNLocator(4))
        if t > MAX_LABELS:  # thinned labels miss the tokens that matter: name the strongest ones on their bars
            for i in np.argsort(-np.abs(values))[:8]:
                ax.annotate(token_label(tokens[i]), (i, values[i]), fontsize=6, ha="center",
                            va="bottom" if values[i] >= 0 else "top")
    target = report.get("target") or {}
    what = target.get("token") if target.get("kind") == "next_token" else target.get("label")
    fig.suptitle(f"attributions of {what!r} (log-probability), per input token", fontsize=10)
    save_figure(fig, path)


def write_figures(report: dict[str, Any], arrays: dict[str, Any] | None, out: Path, layer: int | None = None,
                  head: int | None = None) -> dict[str, Any]:
    """Every figure the report has numbers for, under `out`; returns {"attention": [paths], "rollout": path, ...}.

    `layer` / `head` narrow the attention grids to that layer / head, as `explain(layer=, head=)` narrows the
    per-head summaries."""
    written: dict[str, Any] = {}
    att = attention_array(report, arrays)
    if att is not None:
        layers = range(att.shape[0]) if layer is None else [layer]
        heads = None if head is None else [head]
        written["attention"] = []
        for i in layers:
            p = out / "attention" / f"layer_{i:02d}.png"
            plot_attention_layer(att[i], report["tokens"], i, p, heads)
            written["attention"].append(p)
    roll = rollout_array(report, arrays)
    if roll is not None:
        plot_rollout(roll, report["tokens"], out / "rollout.png")
        written["rollout"] = out / "rollout.png"
    if report.get("logit_lens"):
        plot_logit_lens(report, out / "logit_lens.png")
        written["logit_lens"] = out / "logit_lens.png"
    if report.get("attributions"):
        plot_attributions(report, out / "attributions.png")
        written["attributions"] = out / "attributions.png"
    return written
