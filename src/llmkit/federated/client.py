"""What a federated client does: build the model, train it on its own shard in the one loop, exchange weights.

Only the trainable tensors travel (LoRA adapters + the classifier head with --lora, else every parameter), named
as `named_parameters` names them, so every client and the server agree on the names. A local update is one short
run of `train/loop.py` in a throw-away folder (the loop writes its final weights and metrics there; the folder is
deleted before returning, so many rounds pile up neither files nor memory). FedProx is an objective wrapper: the
task loss plus mu/2·‖w − w_global‖² over the trainable tensors; the server side of FedProx is plain FedAvg.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.errors import CheckpointError
from llmkit.federated.data import FederatedData, Shard
from llmkit.federated.privacy import ExamplePrivacy, detach
from llmkit.infer.load import Loaded
from llmkit.tasks.classify import Classifier, resolve_pooling
from llmkit.tasks.finetune import add_lora
from llmkit.train.loop import evaluate, train
from llmkit.train.objectives import CausalLM, Classify, Objective

if TYPE_CHECKING:
    from llmkit.federated.config import FederatedRunConfig


def build_model(cfg: FederatedRunConfig, base: Loaded, labels: list[str] | None) -> nn.Module:
    """classify: a Classifier over `base.model` (the head seeded by train.seed, so every party starts equal);
    lm: the decoder itself. With finetune.lora the backbone is frozen under peft adapters. `base.model` is
    wrapped, not copied: build one model per Loaded."""
    ft = cfg.finetune
    model: nn.Module = base.model
    if cfg.federated.task == "classify":
        if not labels:
            raise CheckpointError("federated --task classify needs the class names to build the head")
        ft.pooling = resolve_pooling(ft.pooling, base.cfg.arch)
        torch.manual_seed(cfg.train.seed)
        model = Classifier(base.model, len(labels), ft.pooling).to(base.model.embed.weight.device)
    if ft.lora:
        model = add_lora(model, cfg)
    return model.train()


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors that travel: trainable parameters only, detached copies on the CPU."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy received tensors into the model's trainable parameters; names and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"received weights do not fit the model: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]} (were client and server built with the same --model and --lora?)")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise CheckpointError(f"received weights do not fit the model: {n} has shape "
                                      f"{tuple(state[n].shape)}, the model {tuple(p.shape)}")
            p.copy_(state[n])


class LocalObjective:
    """The task objective, plus FedProx's mu/2·‖w − w_global‖² when mu > 0; it also keeps the mean task loss of
    the training steps (the figure a client reports, without the proximal term)."""

    def __init__(self, inner: Objective, model: nn.Module, global_state: dict[str, Tensor], mu: float) -> None:
        self.inner, self.mu, self.name = inner, mu, inner.name + ("+prox" if mu > 0 else "")
        self.anchors = [(p, global_state[n]) for n, p in model.named_parameters() if p.requires_grad] if mu else []
        self.loss_sum, self.calls = 0.0, 0

    def proximal(self) -> Tensor:
        """‖w − w_global‖² over the trainable tensors (w_global is a constant: no gradient flows into it)."""
        total = torch.zeros((), device=self.anchors[0][0].device)
        for i, (p, g) in enumerate(self.anchors):
            if g.device != p.device:  # the loop moved the model after the anchors were taken
                g = g.to(p.device)
                self.anchors[i] = (p, g)
            total = total + (p.float() - g.float()).pow(2).sum()
        return total

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        loss, metrics = self.inner(model, batch)
        if model.training:
            self.loss_sum, self.calls = self.loss_sum + float(loss.detach()), self.calls + 1
        if not self.mu:
            return loss, metrics
        prox = self.proximal()
        return loss + 0.5 * self.mu * prox, {**metrics, "proximal": prox.detach()}


def local_steps(cfg: FederatedRunConfig, shard: Shard) -> int:
    """federated.local_steps, or local_epochs passes over the shard in batches of data.batch_size."""
    fed = cfg.federated
    return fed.local_steps or max(1, math.ceil(fed.local_epochs * shard.n_examples / cfg.data.batch_size))


def local_update(model: nn.Module, shard: Shard, cfg: FederatedRunConfig, global_state: dict[str, Tensor],
                 round: int, workdir: Path, privacy: ExamplePrivacy | None = None
                 ) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Start from the global weights, train on this shard only, return the new trainable weights and
    {train_loss (mean task loss of the local steps), examples (FedAvg's weight), steps}. With `privacy` the
    steps are per-example DP-SGD (opacus) and its accountant counts them."""
    load_trainable(model, global_state)
    steps = local_steps(cfg, shard)
    # A fresh optimiser each round (its state never leaves the client); no evaluation, checkpoints or time budget
    # inside a round: the server evaluates the global model.
    tcfg = replace(cfg.train, max_steps=steps, max_minutes=0.0, eval_interval=0, save_interval=0,
                   early_stop_patience=0, log_interval=max(1, steps))
    seed = cfg.train.seed + 1009 * round + shard.client  # dropout differs per client and round, reproducibly
    torch.manual_seed(seed)
    fed = cfg.federated
    inner: Objective = Classify() if fed.task == "classify" else CausalLM()
    objective = LocalObjective(inner, model, global_state, fed.mu if fed.strategy == "fedprox" else 0.0)
    net, wrap = model, None
    if privacy is not None:  # each example's gradient is clipped instead of the batch's
        net, wrap = privacy.attach(model, seed)
        tcfg = replace(tcfg, grad_clip=0.0)
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"client{shard.client}-round{round}-", dir=workdir))
    try:
        train(net, objective, tcfg, shard.batches(cfg.data.batch_size, seed), [], run_dir, quiet=True,
              wrap_optimizer=wrap)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if privacy is not None:
            detach(net)
    if privacy is not None:
        privacy.steps += steps
    return trainable_state(model), {"train_loss": objective.loss_sum / max(1, objective.calls),
                                    "examples": float(shard.n_examples), "steps": float(steps)}


@torch.no_grad()
def evaluate_global(model: nn.Module, data: FederatedData, split: str = "val") -> dict[str, float]:
    """The global model on the server's held-out batches: classify -> {loss, accuracy, macro_f1}
    (scikit-learn, over every example); lm -> {loss, perplexity}."""
    batches = data.val if split == "val" else data.test
    if not batches:
        raise CheckpointError(f"no {split} batches to evaluate on (lm has only val)")
    device = next(model.parameters()).device
    if data.task == "lm":
        loss = evaluate(model, CausalLM(), batches, device, torch.float32)["loss"]
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    from sklearn.metrics import accuracy_score, f1_score

    was_training = model.training
    model.eval()
    preds, true, loss_sum = [], [], 0.0
    for b in batches:
        logits = model(b["input_ids"].to(device), attention_mask_2d=b["attention_mask"].to(device)).logits  # (B, K)
        loss_sum += float(F.cross_entropy(logits.float(), b["labels"].to(device), reduction="sum"))
        preds.append(logits.argmax(-1).cpu())
        true.append(b["labels"])
    model.train(was_training)
    p, t = torch.cat(preds).numpy(), torch.cat(true).numpy()
    k = list(range(len(data.labels or [])))
    return {"loss": loss_sum / len(t), "accuracy": float(accuracy_score(t, p)),
            "macro_f1": float(f1_score(t, p, labels=k, average="macro", zero_division=0))}
