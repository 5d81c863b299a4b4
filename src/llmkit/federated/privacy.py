"""Differential privacy for federated rounds: clipping, Gaussian noise, the accountant, at two levels.

User level (DP-FedAvg): each client's update (its new trainable weights minus the global ones) is clipped to L2
norm `C`; the server averages the clipped updates and adds N(0, (z·C/m)²) per coordinate (z the noise multiplier,
m the clients in the round) — McMahan et al. 2018, the mechanism of Flower's
`DifferentialPrivacyServerSideFixedClipping`. One round is one subsampled Gaussian mechanism whose sample rate is
the fraction of clients asked, so the privacy spent after R rounds is opacus's RDP accountant over R steps at that
rate, for the chosen δ.

Two protected units, `federated.dp_level`:
  * `example` (the default): each client runs per-example DP-SGD on its own shard (opacus's GradSampleModule +
    DPOptimizer inside the one loop: every example's gradient clipped to `C`, Gaussian noise z·C on the sum) and
    keeps its own RDP accountant (sample rate batch/shard size, one step per optimiser step, over the rounds it
    took part in). What leaves the client is already private; the server only averages. This is the level that
    still learns with 10 clients: the noise is spread over a batch of examples, not over 3 clients.
  * `client` (user-level DP-FedAvg): the server-side mechanism above, through Flower's wrapper. It protects a
    data owner's whole shard, but with 3 clients per round its noise drowns the update (bench/RESULTS.md).

Why opacus for the accounting: Flower 1.42's own accountant (`flwr.supercore.privacy_accounting`) needs the
`dp-accounting` package (not installed) and, for fixed clipping, only accepts `no-amplification`: it cannot credit
client sampling. Opacus's RDP accountant assumes Poisson sampling; clients draw shuffled fixed-size batches, the
usual approximation (as in opacus's own examples without its DPDataLoader).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from llmkit.errors import ConfigError


def update_norm(update: dict[str, Tensor]) -> float:
    """The L2 norm of all tensors of an update taken together (the vector that DP clips)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def clip_update(update: dict[str, Tensor], max_norm: float) -> tuple[dict[str, Tensor], float]:
    """Scale the whole update down to L2 norm `max_norm` if it is longer; returns (clipped, norm before)."""
    if not max_norm > 0:
        raise ConfigError(f"federated.clip: {max_norm} (the clipping norm must be > 0)")
    norm = update_norm(update)
    scale = min(1.0, max_norm / (norm + 1e-12))
    return {k: v * scale for k, v in update.items()}, norm


def add_gaussian_noise(update: dict[str, Tensor], std: float,
                       generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """update + N(0, std²) per coordinate (float32 noise, drawn on the CPU so a seed gives the same noise
    everywhere)."""
    out = {}
    for k, v in update.items():
        noise = torch.randn(v.shape, generator=generator, dtype=torch.float32) * std
        out[k] = (v.float() + noise.to(v.device)).to(v.dtype)
    return out


def _check(sample_rate: float, rounds: int, delta: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"federated.fraction: {sample_rate} (the share of clients per round must be in (0, 1])")
    if rounds < 0:
        raise ConfigError(f"federated.rounds: {rounds} (must be >= 0)")
    if not 0 < delta < 1:
        raise ConfigError(f"federated.delta: {delta} (must be in (0, 1); 1/N is usual)")


def epsilon_spent(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε after `rounds` rounds of the subsampled Gaussian mechanism (opacus RDP); 0 before any round,
    inf without noise."""
    _check(sample_rate, rounds, delta)
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, rounds)]
    return float(acc.get_epsilon(delta=delta))


def noise_for_epsilon(epsilon: float, delta: float, sample_rate: float, rounds: int, unit: str = "rounds") -> float:
    """The smallest noise multiplier (to opacus's 0.01 tolerance in ε) whose `rounds` rounds (or steps: `unit`)
    spend at most `epsilon`."""
    if not epsilon > 0:
        raise ConfigError(f"federated.epsilon: {epsilon} (the privacy budget must be > 0; e.g. 8)")
    _check(sample_rate, rounds, delta)
    if rounds < 1:
        raise ConfigError("federated.rounds: at least one round is needed to choose the noise for an epsilon")
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=rounds, accountant="rdp"))
    except ValueError:
        raise ConfigError(f"federated.epsilon: {epsilon} is out of reach for delta {delta} over {rounds} {unit} "
                          "(the noise would exceed 1e6); raise --epsilon or --delta") from None


class ExamplePrivacy:
    """One client's per-example DP-SGD: the noise its planned steps need for `epsilon`, and the ε spent so far.

    The plan assumes the client is asked every round (rounds x steps per round): an upper bound, so the ε it
    reports never exceeds the target whatever the sampling does."""

    def __init__(self, epsilon: float, delta: float, noise_multiplier: float, clip: float, batch_size: int,
                 n_examples: int, planned_steps: int) -> None:
        if n_examples < 1:
            raise ConfigError("federated.dp: a client with no examples cannot train privately")
        self.rate = min(1.0, batch_size / n_examples)
        self.delta = delta or 1.0 / n_examples
        self.clip, self.batch_size, self.steps = clip, batch_size, 0
        self.noise = noise_multiplier or noise_for_epsilon(epsilon, self.delta, self.rate, planned_steps, "steps")

    def epsilon(self) -> float:
        return epsilon_spent(self.noise, self.rate, self.steps, self.delta)

    def attach(self, model: torch.nn.Module, seed: int) -> tuple[torch.nn.Module, Callable[[Optimizer], Optimizer]]:
        """`model` with per-example gradient hooks (`detach(wrapped)` removes them) and the optimiser wrapper the
        loop takes (`train(..., wrap_optimizer=)`): clipping and noise happen in the wrapped optimiser's step."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        try:
            wrapped = GradSampleModule(model)
        except Exception as e:  # opacus names the module it cannot take per-example gradients of
            raise ConfigError(f"federated.dp: per-example gradients are not available for this model "
                              f"({str(e).splitlines()[0][:200]}); try --lora") from None
        gen = torch.Generator().manual_seed(seed)

        def wrap(opt: Optimizer) -> Optimizer:
            return DPOptimizer(opt, noise_multiplier=self.noise, max_grad_norm=self.clip,
                               expected_batch_size=self.batch_size, generator=gen)

        return wrapped, wrap


def detach(wrapped: torch.nn.Module) -> None:
    """Remove opacus's hooks (a client wraps its one model anew every round)."""
    wrapped._close()  # type: ignore[operator]
