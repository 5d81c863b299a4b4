"""Several processes, one model: the process group torchrun describes, and the two ways to spread a model over it.

`ddp` keeps a whole copy of the model on every rank and averages the gradients (DistributedDataParallel): the
choice while the weights, gradients and AdamW state fit one device. `fsdp` (FSDP2, `fully_shard`) keeps a 1/world
slice of every parameter, gradient and optimizer state on each rank and gathers one block's weights just before
it runs: models several times larger than one device, for the price of more communication. Either way each rank
reads its own slice of the global batch, so the losses are those of one process with the global batch.

Checkpoints do not depend on the strategy: the full weights and optimizer state are gathered to rank 0 and written
in the single-process format, so any run folder resumes on any number of processes and loads with `llmkit.load`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from llmkit.model.weights import weights_for_save


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Dist:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    return Dist(rank=dist.get_rank(), world=world, local_rank=local)


def broadcast_from_main(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Rank 0's numbers on every rank: decisions that all ranks must take alike (a plan, a stop)."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)  # (n,) NCCL needs it on the GPU, gloo on the CPU
    dist.broadcast(t, src=0)
    return t.tolist()


def mean_over_ranks(values: dict[str, float], d: Dist, device: torch.device) -> dict[str, float]:
    """Each rank evaluated its slice of the validation batches (equal slices): the figures of the whole set."""
    if d.world == 1 or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)  # (n,)
    dist.all_reduce(t)
    return {k: v / d.world for k, v in zip(values, t.tolist())}


class Parallel:
    """How this process holds the model (whole, a DDP replica, or an FSDP shard) and what that changes for the loop:
    wrapping, gradient sync during accumulation, and gathering full state dicts for checkpoints."""

    def __init__(self, strategy: str, d: Dist, device: torch.device) -> None:
        self.dist, self.device = d, device
        self.kind = "single" if d.world == 1 else ("ddp" if strategy == "auto" else strategy)
        self._saved_names: list[str] = []
        self._model: nn.Module | None = None
        self._net: nn.Module | None = None

    def wrap(self, model: nn.Module, compile: bool = False) -> nn.Module:
        """Place `model` (its full weights, identical on every rank) and return the module to call in training.

        FSDP shards `model` in place (every block, then the root, which keeps the embeddings and a tied head
        together); the shards move to the device, so the whole model never has to fit on it."""
        if self.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            self._saved_names = list(weights_for_save(model))  # tied duplicates dropped, as one process saves
            mesh = init_device_mesh(self.device.type, (self.dist.world,))
            for blocks in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
                for block in blocks:
                    fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        else:
            model.to(self.device)
        net = torch.compile(model) if compile else model
        if self.kind == "ddp":
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None)
        self._model, self._net = model, net
        return net

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient all-reduce / reduce-scatter on the micro-batches before the last of an accumulation."""
        if sync or self.kind == "single":
            return contextlib.nullcontext()
        if self.kind == "ddp":
            return self._net.no_sync()  # type: ignore[union-attr]
        return _fsdp_no_sync(self._model)  # type: ignore[arg-type]

    def full_weights(self, model: nn.Module) -> dict[str, Tensor]:
        """Every rank calls this (FSDP gathers); rank 0 gets the CPU weights named as one process saves them."""
        if self.kind != "fsdp":
            return weights_for_save(model) if self.dist.main else {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: full[k].contiguous() for k in self._saved_names} if self.dist.main else {}

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Every rank calls this; rank 0 gets `optimizer.state_dict()` as one process would write it."""
        if self.kind != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _names_to_indices(full) if self.dist.main else {}

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a single-process optimizer state (every rank read the same checkpoint); FSDP keeps its slice."""
        if self.kind != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        set_optimizer_state_dict(model, optimizer, _indices_to_names(state, order),
                                 options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def _names_to_indices(osd: dict[str, Any]) -> dict[str, Any]:
    """torch.distributed's full optimizer state (keyed by parameter name) -> `Optimizer.state_dict()`'s layout
    (parameters numbered in param-group order): the one checkpoint format, whoever wrote it."""
    index: dict[str, int] = {}
    groups = []
    for g in osd["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in g["params"]]
        groups.append({**g, "params": ids})
    return {"state": {index[n]: s for n, s in osd["state"].items()}, "param_groups": groups}


def _indices_to_names(osd: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """The inverse of `_names_to_indices`, for this optimizer's parameter order."""
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": {order[int(i)]: s for i, s in osd["state"].items()}, "param_groups": groups}
