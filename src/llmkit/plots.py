"""Pictures llmkit writes: the loss curve of a run, a classifier's confusion matrix. One way to save a figure.

matplotlib runs headless (Agg) and every PNG is written to a temporary name and renamed, like every other file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.files import atomic_write


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported on first use: figures render with no display, and verbs
    that draw nothing do not pay matplotlib's import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as a PNG atomically, then free it."""
    plt = pyplot()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_metrics(metrics_path: Path, out_png: Path) -> None:
    """Training loss per logged step and validation loss per evaluation, on one axis."""
    if not metrics_path.exists():
        return
    train, val = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash: the resumed run rewrites it
            continue
        if "loss" in rec:
            train.append((rec["step"], rec["loss"]))
        if "val_loss" in rec:
            val.append((rec["step"], rec["val_loss"]))
    if not train:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train loss", lw=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(metrics_path.parent.name)
    save_figure(fig, out_png)


def plot_confusion(cm: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    """A confusion matrix (rows: true class, columns: predicted) as a PNG."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 1.2 * len(labels) + 2.5), dpi=110)
    ConfusionMatrixDisplay(cm, display_labels=labels).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
