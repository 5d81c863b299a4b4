"""What a federated run writes: rounds.jsonl, the global weights after each round, the final run folder, a PNG.

The run folder is a model folder every verb loads: config.yaml is a plain fine-tuning config (classify: class
names, pooling, max length) or run config (lm), model.safetensors holds the final global model with any LoRA
adapters merged in, tokenizer/ the base model's tokenizer. The federated recipe itself is kept beside it as
federated.yaml (a `federated` section in config.yaml would make it a file no other verb reads). rounds/NNN/ holds
the weights that travelled in round NNN (the trainable state: LoRA adapters + head with --lora), which with the
base model rebuild that round's global model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.config import FinetuneRunConfig, RunConfig, save_yaml
from llmkit.errors import ConfigError
from llmkit.federated.client import evaluate_global
from llmkit.files import atomic_write_text
from llmkit.model.weights import save_weights
from llmkit.plots import pyplot, save_figure
from llmkit.tasks.finetune import write_classifier_folder
from llmkit.train.checkpoint import remove_outputs

if TYPE_CHECKING:
    from flwr.app import ArrayRecord
    from torch import nn

    from llmkit.federated.config import FederatedRunConfig
    from llmkit.federated.data import FederatedData

OUTPUTS = ("rounds.jsonl", "rounds", "federated.yaml", "config.yaml", "model.safetensors", "tokenizer", "eval.json",
           "rounds.png")
"""Everything a federated run writes into its folder (what --overwrite removes)."""


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to mix a run into an earlier one (or into a folder that is not a folder)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder")
    used = [n for n in OUTPUTS if (out / n).exists()]
    if used and not overwrite:
        raise ConfigError(f"--out {out} holds an earlier run ({', '.join(used[:3])}): pass --overwrite to start again")


def clear_out_dir(out: Path) -> None:
    remove_outputs(out, OUTPUTS)


class Recorder:
    """Writes each round as it ends (a run cut short keeps its rounds) and the run folder at the end."""

    def __init__(self, cfg: FederatedRunConfig, model: nn.Module, data: FederatedData, out: Path) -> None:
        self.cfg, self.model, self.data, self.out = cfg, model, data, out
        self.rows: list[dict[str, Any]] = []
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "federated.yaml")
        atomic_write_text(out / "rounds.jsonl", "")

    def record(self, row: dict[str, Any], arrays: ArrayRecord) -> None:
        self.rows.append(row)
        with (self.out / "rounds.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.cfg.federated.save_rounds:
            folder = self.out / "rounds" / f"{row['round']:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            save_weights({k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()},
                         folder / "trainable.safetensors", metadata={"format": "pt", "round": str(row["round"])})

    def finish(self) -> dict[str, Any]:
        """The final global model as a run folder (the model must hold the final weights), eval.json and the
        PNG; returns the final figures."""
        cfg, out, tok = self.cfg, self.out, self.data.tokenizer
        final: dict[str, Any] = {"rounds": len(self.rows) - 1, **{k: v for k, v in self.rows[-1].items()
                                                               if k != "round"}}
        if cfg.federated.task == "classify":
            test = evaluate_global(self.model, self.data, "test")
            final |= {f"test_{k}": v for k, v in test.items()}
            plain = FinetuneRunConfig(model=cfg.model, data=cfg.data, train=cfg.train, finetune=cfg.finetune)
        else:
            plain = RunConfig(model=cfg.model, data=cfg.data, train=cfg.train)
        write_classifier_folder(self.model, plain, tok, out)  # type: ignore[arg-type]
        atomic_write_text(out / "eval.json", json.dumps(final, indent=2))
        plot_rounds(self.rows, out / "rounds.png", f"{out.name}: {cfg.federated.strategy}"
                    f"{' + DP' if cfg.federated.dp else ''}, {cfg.federated.clients} clients, {cfg.federated.split}")
        return final


def plot_rounds(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy (classify) or validation loss (lm) of the global model per round."""
    key = "accuracy" if "accuracy" in rows[0] else "val_loss"
    pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*pts), "o-", lw=1.5)
    ax.set_xlabel("round")
    ax.set_ylabel("validation accuracy" if key == "accuracy" else "validation loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    save_figure(fig, path)
