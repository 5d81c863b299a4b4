"""What a federated run is: the fine-tuning sections plus how the clients, rounds, strategy and privacy are set.

A federated run reuses `FinetuneRunConfig` (base model, LoRA, text/label fields, max length in `finetune`; batch
size in `data`; optimiser in `train`) and adds one `federated` section. The YAML recipe mirrors it key for key and
unknown keys are errors, as everywhere. The run folder's `config.yaml` stays a plain finetune (classify) or run (lm)
config so every verb loads the final model; the whole recipe is kept beside it as `federated.yaml`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.config import FinetuneRunConfig, apply_overrides, build, coerce, load_yaml
from llmkit.errors import ConfigError

TASKS = ("classify", "lm")
SPLITS = ("iid", "dirichlet", "by-document")
STRATEGIES = ("fedavg", "fedprox")
DP_LEVELS = ("example", "client")
ENGINES = ("local", "simulation")


def _require(ok: bool, key: str, value: Any, valid: str) -> None:
    """`key: must be <valid>, got <value>` unless `ok` (written as the valid condition, so NaN fails it too)."""
    if not ok:
        raise ConfigError(f"{key}: must be {valid}, got {value!r}")


@dataclass
class FederatedConfig:
    """How the data owners (clients) train together: rounds, the split of the data, strategy and privacy."""

    task: str = "classify"
    """`classify` (one label per text; the final model loads in `llmkit classify`) or `lm` (causal LM on text;
    the final model loads in `llmkit generate` / `eval`)."""
    clients: int = 10
    """Number of data owners; each gets its own shard of the training split and never sees another's."""
    rounds: int = 5
    """Federated rounds: the server sends the global weights, sampled clients train locally, the server averages."""
    fraction: float = 1.0
    """Share of the clients sampled each round, in (0, 1] (at least one client is always sampled)."""
    local_steps: int = 0
    """Optimiser steps each sampled client runs per round (0 = use local_epochs)."""
    local_epochs: float = 1.0
    """Passes over its own shard each sampled client makes per round (used when local_steps is 0)."""
    split: str = "iid"
    """How the training split is dealt to clients: `iid` (shuffled, equal shares), `dirichlet` (label shares per
    client drawn from Dirichlet(alpha): non-IID; classify only) or `by-document` (whole documents per client)."""
    alpha: float = 0.5
    """Dirichlet concentration for split dirichlet: small (0.1) = each client holds mostly one label, large (100)
    = close to IID."""
    strategy: str = "fedavg"
    """`fedavg` (weighted average of the clients' weights) or `fedprox` (FedAvg on the server; each client adds
    mu/2 * ||w - w_global||^2 to its loss, which keeps non-IID clients from drifting apart)."""
    mu: float = 0.01
    """FedProx proximal weight (strategy fedprox only)."""
    dp: bool = False
    """Differential privacy (see dp_level); the accountant (opacus RDP) reports epsilon for delta every round."""
    dp_level: str = "example"
    """What DP protects. `example`: each client trains with per-example DP-SGD (opacus: every example's gradient
    clipped to `clip`, Gaussian noise noise_multiplier x clip on the batch's sum) and accounts its own epsilon;
    use it with --lora (per-example gradients of every weight are costly). `client`: the server clips each
    client's whole update to `clip` and adds noise (std noise_multiplier x clip / sampled clients) to their
    average (Flower's DP-FedAvg); it protects a data owner's whole shard but needs many clients per round."""
    noise_multiplier: float = 0.0
    """DP noise std as a multiple of clip (0 = chosen from epsilon and delta for the planned rounds/steps)."""
    clip: float = 1.0
    """DP: largest L2 norm of one example's gradient (dp_level example) or of one client's update (client)."""
    epsilon: float = 0.0
    """DP privacy budget to spend over all rounds (used when noise_multiplier is 0)."""
    delta: float = 0.0
    """DP delta (0 = 1 / the protected units: a client's examples for dp_level example, the clients for
    client)."""
    seed: int = 0
    """Seed of the split, the client sampling and the DP noise."""
    engine: str = "local"
    """How one machine runs the clients: `local` (a Flower Grid that delivers each Message, serialised, to the
    ClientApp in this process: one process, no startup cost, memory flat over rounds) or `simulation` (Flower's
    simulation runtime on Ray actors: for many-core machines). Across machines use flower-superlink/supernode."""
    save_rounds: bool = True
    """Keep the global model's exchanged weights after each round in rounds/NNN/ (the final round is also the
    run folder's full model)."""

    def __post_init__(self) -> None:
        _require(self.task in TASKS, "federated.task", self.task, f"one of {', '.join(TASKS)}")
        _require(1 <= self.clients <= 1 << 20, "federated.clients", self.clients, "a positive integer")
        _require(1 <= self.rounds <= 1 << 20, "federated.rounds", self.rounds, "a positive integer")
        _require(0 < self.fraction <= 1, "federated.fraction", self.fraction, "in (0, 1]")
        _require(0 <= self.local_steps < 1 << 40, "federated.local_steps", self.local_steps,
                 "0 (use local_epochs) or more")
        _require(0 <= self.local_epochs < 1e6, "federated.local_epochs", self.local_epochs, "0 or more")
        _require(self.local_steps > 0 or self.local_epochs > 0, "federated.local_steps / local_epochs",
                 (self.local_steps, self.local_epochs), "a positive number of steps or epochs")
        _require(self.split in SPLITS, "federated.split", self.split, f"one of {', '.join(SPLITS)}")
        _require(0 < self.alpha < math.inf, "federated.alpha", self.alpha, "a positive number (e.g. 0.3)")
        _require(self.strategy in STRATEGIES, "federated.strategy", self.strategy, f"one of {', '.join(STRATEGIES)}")
        _require(0 <= self.mu < math.inf, "federated.mu", self.mu, "0 or more")
        _require(0 <= self.noise_multiplier < math.inf, "federated.noise_multiplier", self.noise_multiplier,
                 "0 (from epsilon) or more")
        _require(0 < self.clip < math.inf, "federated.clip", self.clip, "a positive number")
        _require(0 <= self.epsilon < math.inf, "federated.epsilon", self.epsilon, "a positive number")
        _require(0 <= self.delta < 1, "federated.delta", self.delta, "in [0, 1) (0 = 1 / clients)")
        _require(self.dp_level in DP_LEVELS, "federated.dp_level", self.dp_level, f"one of {', '.join(DP_LEVELS)}")
        _require(self.engine in ENGINES, "federated.engine", self.engine, f"one of {', '.join(ENGINES)}")
        if self.dp and self.noise_multiplier == 0 and self.epsilon <= 0:
            raise ConfigError("federated.epsilon: --dp needs --epsilon > 0 (with --delta) or --noise-multiplier > 0, "
                              f"got epsilon {self.epsilon!r}")
        if self.dp and self.dp_level == "example" and self.strategy == "fedprox":
            raise ConfigError("federated.strategy: fedprox's proximal term is not a per-example loss, so it cannot "
                              "run under --dp-level example; use fedavg, or --dp-level client")
        if self.split == "dirichlet" and self.task != "classify":
            raise ConfigError("federated.split: dirichlet splits over labels, so it needs --task classify "
                              "(use iid or by-document for lm)")

    @property
    def dp_delta(self) -> float:
        """The delta of client-level DP: the given one, or 1 / clients."""
        return self.delta or 1.0 / self.clients

    @property
    def clients_per_round(self) -> int:
        """How many clients each round samples (Flower's rule: fraction x clients, at least one)."""
        return max(1, int(self.fraction * self.clients))


@dataclass
class FederatedRunConfig(FinetuneRunConfig):
    """A federated run: a fine-tuning run's sections (base model, LoRA, data, optimiser) plus the federation."""

    federated: FederatedConfig = field(default_factory=FederatedConfig)


def federated_defaults(task: str, lora: bool) -> dict[str, Any]:
    """Hyper-parameters that differ from pretraining's (dotted keys); any can be overridden. Local runs are short,
    so warmup and evaluation inside a client are off: the server evaluates the global model each round."""
    out: dict[str, Any] = {"data.batch_size": 16, "train.lr": 1e-3 if lora else 1e-4, "train.warmup_steps": 0,
                           "train.min_lr_ratio": 1.0, "train.weight_decay": 0.01, "train.beta2": 0.999,
                           "train.eval_interval": 0, "train.early_stop_patience": 0, "train.log_interval": 10,
                           "train.eval_iters": 1, "finetune.epochs": 0}
    if task == "classify":
        out |= {"train.objective": "classify", "train.select_metric": "val_accuracy"}
    return out


def federated_config(config_file: str | Path | None, overrides: dict[str, Any]) -> FederatedRunConfig:
    """Defaults for federated training, then the YAML recipe, then the command line; checks a model and data."""
    values = load_yaml(config_file) if config_file else {}
    fed = values.get("federated") if isinstance(values.get("federated"), dict) else {}
    ft = values.get("finetune") if isinstance(values.get("finetune"), dict) else {}
    task = str(overrides.get("federated.task", fed.get("task", "classify")))
    lora = coerce(overrides.get("finetune.lora", ft.get("lora", False)), bool, "finetune.lora")
    given = {f"{sec}.{k}" for sec, v in values.items() if isinstance(v, dict) for k in v} | set(overrides)
    defaults = {k: v for k, v in federated_defaults(task, lora).items() if k not in given}
    cfg = build(FederatedRunConfig, apply_overrides(apply_overrides(values, defaults), overrides))
    if not cfg.finetune.base or "data.path" not in given:
        raise ConfigError("federated needs --model NAME|RUN_DIR and --data NAME|FILE (e.g. --data movie-reviews)")
    want = "classify" if cfg.federated.task == "classify" else "causal_lm"
    if cfg.train.objective != want:
        raise ConfigError(f"train.objective: federated --task {cfg.federated.task} trains with {want}, "
                          f"got {cfg.train.objective!r}")
    return cfg
