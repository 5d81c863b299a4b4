"""Flower's ServerApp and ClientApp for llmkit, on the Message API: the only code that runs on each side.

`client_app` trains on the shard its node holds and replies with two records: an ArrayRecord of the trainable
weights (LoRA adapters + head with LoRA) and a MetricRecord of scalars; `check_reply` on the server refuses any
reply that holds anything else, so data cannot travel even by mistake. `server_app` runs FedAvg or FedProx
(wrapped in Flower's server-side fixed-clipping DP strategy with --dp), evaluates the global model on its own
held-out split after every round and writes the run folder.

Both are module attributes that read their settings from Flower's run config (`recipe`: the YAML of a
FederatedRunConfig; `out`: the run folder) and node config (`partition-id` / `num-partitions` in a simulation,
or `data-path`: the data owner's own file), so `flower-superlink` / `flower-supernode` can load them as
`llmkit.federated.apps:server_app` and `llmkit.federated.apps:client_app`.
"""

from __future__ import annotations

import copy
import math
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from llmkit.config import build, to_dict
from llmkit.errors import ConfigError, DataError
from llmkit.federated.client import (
    build_model,
    evaluate_global,
    load_trainable,
    local_steps,
    local_update,
    trainable_state,
)
from llmkit.federated.config import FederatedRunConfig
from llmkit.federated.data import FederatedData, Shard, load_federated_data
from llmkit.federated.privacy import ExamplePrivacy, epsilon_spent, noise_for_epsilon
from llmkit.federated.record import Recorder
from llmkit.infer.load import load_model

REPLY_METRICS = {"num-examples", "unit-weight", "train_loss", "epsilon"}
"""The only figures a client's reply may carry: how many examples it trained on (FedAvg's weight), a constant 1
(the uniform weight client-level DP needs), its mean training loss and (per-example DP) the ε it has spent."""


def recipe_text(cfg: FederatedRunConfig) -> str:
    """The recipe as it travels in Flower's run config (one string value)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def read_recipe(text: str, where: str = "run config `recipe`") -> FederatedRunConfig:
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected the YAML mapping of a federated recipe")
    return build(FederatedRunConfig, values)


def _recipe(context: Context) -> FederatedRunConfig:
    text = context.run_config.get("recipe")
    if not isinstance(text, str) or not text:
        raise ConfigError("Flower run config: `recipe` (the YAML text of a federated recipe) is missing; run "
                          "`llmkit federated`, or pass --run-config with recipe=... to `flwr run`")
    path = Path(text)
    if "\n" not in text and path.suffix in (".yaml", ".yml") and path.is_file():
        return read_recipe(path.read_text(encoding="utf-8"), str(path))
    return read_recipe(text)


def resolve_noise(cfg: FederatedRunConfig) -> float:
    """Client-level DP's noise multiplier: the one given, or the smallest that spends at most epsilon over the
    rounds (0 without DP or with per-example DP, whose clients choose their own: `example_privacy`)."""
    fed = cfg.federated
    if not fed.dp or fed.dp_level == "example":
        return 0.0
    if fed.noise_multiplier > 0:
        return fed.noise_multiplier
    return noise_for_epsilon(fed.epsilon, fed.dp_delta, fed.clients_per_round / fed.clients, fed.rounds)


def example_privacy(cfg: FederatedRunConfig, shard: Shard) -> ExamplePrivacy:
    """A client's per-example DP-SGD plan: its own shard size sets the sample rate (and δ = 1/examples unless
    --delta), the recipe's rounds x local steps bound the steps it may take."""
    fed = cfg.federated
    return ExamplePrivacy(fed.epsilon, fed.delta, fed.noise_multiplier, fed.clip, cfg.data.batch_size,
                          shard.n_examples, fed.rounds * local_steps(cfg, shard))


# --------------------------------------------------------------------------------------------- client side


@dataclass
class ClientSide:
    """What one client process keeps between rounds: its data, one model (weights replaced every round)."""

    cfg: FederatedRunConfig
    data: FederatedData
    model: torch.nn.Module
    workdir: tempfile.TemporaryDirectory = field(default_factory=tempfile.TemporaryDirectory)
    privacy: dict[int, ExamplePrivacy] = field(default_factory=dict)  # per partition: its accountant


_CLIENTS: dict[tuple[str, str], ClientSide] = {}


def _client_side(context: Context) -> tuple[ClientSide, int]:
    """This node's data and model, loaded once per process. A simulated node is told its partition; a real data
    owner names its own file (`data-path`) and trains on all of it."""
    cfg = _recipe(context)
    node = context.node_config
    if "data-path" in node:
        cfg.data.path = str(node["data-path"])
        cfg.federated.clients, cfg.federated.split, partition = 1, "iid", 0
    else:
        partition = int(node.get("partition-id", 0))
    key = (str(context.run_config.get("recipe")), cfg.data.path)
    if key not in _CLIENTS:
        _CLIENTS.clear()  # one experiment per process at a time: memory stays bounded over many runs
        base = load_model(cfg.finetune.base, seed=cfg.train.seed)
        data = load_federated_data(cfg, base.tokenizer, min(cfg.finetune.max_length, base.cfg.block_size))
        _CLIENTS[key] = ClientSide(cfg, data, build_model(cfg, base, data.labels))
    return _CLIENTS[key], partition


client_app = ClientApp()


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """One round on this node: take the global weights, run the loop on the own shard, send the new weights."""
    side, partition = _client_side(context)
    config = msg.content["config"]
    cfg = copy.deepcopy(side.cfg)
    if "proximal-mu" in config:  # FedProx: Flower's strategy sends mu; the client adds the proximal term
        cfg.federated.strategy, cfg.federated.mu = "fedprox", float(config["proximal-mu"])  # type: ignore[arg-type]
    shard = side.data.clients[partition]
    privacy = None
    if cfg.federated.dp and cfg.federated.dp_level == "example":
        privacy = side.privacy.setdefault(partition, example_privacy(cfg, shard))
    state, metrics = local_update(side.model, shard, cfg, msg.content["arrays"].to_torch_state_dict(),
                                  int(config["server-round"]), Path(side.workdir.name), privacy)  # type: ignore
    figures = {"num-examples": int(shard.n_examples), "unit-weight": 1, "train_loss": float(metrics["train_loss"])}
    if privacy is not None:
        figures["epsilon"] = privacy.epsilon()
    reply = RecordDict({"arrays": ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()}),
                        "metrics": MetricRecord(figures)})
    return Message(reply, reply_to=msg)


# --------------------------------------------------------------------------------------------- server side


def check_reply(msg: Message, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Refuse a reply that carries anything but the trainable weights (same names, shapes and float dtypes as
    the global ones) and the allowed scalar figures: the guarantee that a client's data never reaches the server."""
    if msg.has_error():
        return
    c = msg.content
    if set(c.keys()) != {"arrays", "metrics"} or c.config_records:
        raise DataError(f"a client's reply holds records {sorted(c.keys())}; only `arrays` and `metrics` may travel")
    arrays, metrics = c.array_records["arrays"], c.metric_records["metrics"]
    got = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
    if got != expected:
        raise DataError("a client's reply holds arrays that are not the global model's trainable weights")
    if set(metrics) - REPLY_METRICS or not all(isinstance(v, (int, float)) for v in metrics.values()):
        raise DataError(f"a client's reply holds figures {sorted(metrics)}; only {sorted(REPLY_METRICS)} may travel")


def train_messages_bytes(messages: list[Message]) -> int:
    return sum(m.content.array_records["arrays"].count_bytes() for m in messages if m.has_content())


class CountingGrid(Grid):
    """The server's view of the network: every reply is checked (`check_reply`), the payload bytes of the
    weights sent to clients and received from them are counted, and the round's training loss is kept."""

    def __init__(self, grid: Grid) -> None:
        self.inner = grid
        self.expected: dict[str, tuple[tuple[int, ...], str]] = {}
        self.round: dict[str, float] = {}
        self.epsilon = 0.0  # per-example DP: the most any client reports having spent so far

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, *a: Any, **kw: Any) -> Message:
        return self.inner.create_message(*a, **kw)

    def get_node_ids(self) -> Any:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Any) -> Any:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Any) -> Any:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        down = train_messages_bytes(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        for r in replies:
            check_reply(r, self.expected)
        ok = [r for r in replies if not r.has_error()]
        if ok:
            n = sum(float(r.content["metrics"]["num-examples"]) for r in ok)  # type: ignore[arg-type]
            loss = sum(float(r.content["metrics"]["train_loss"]) * float(r.content["metrics"]["num-examples"])
                       for r in ok) / max(n, 1.0)  # type: ignore[arg-type]
            self.round = {"clients": len(ok), "train_loss": loss, "bytes_down": down,
                          "bytes_up": train_messages_bytes(ok)}
            spent = [float(r.content["metrics"]["epsilon"]) for r in ok  # type: ignore[arg-type]
                     if "epsilon" in r.content["metrics"]]
            self.epsilon = max([self.epsilon, *spent])
        failed = [r.error.reason for r in replies if r.has_error()]
        if failed:
            raise DataError(f"{len(failed)} client(s) failed this round: {failed[0]}")
        return replies


def make_strategy(cfg: FederatedRunConfig, noise: float) -> Any:
    """FedAvg or FedProx sampling `clients_per_round` nodes, inside Flower's server-side fixed-clipping DP wrapper
    with client-level DP (per-example DP happens in the clients). With it every client weighs the same
    (`unit-weight`): the noise std z*C/m assumes each clipped update moves the average by at most C/m."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, FedProx

    fed = cfg.federated
    client_dp = fed.dp and fed.dp_level == "client"
    kw: dict[str, Any] = dict(fraction_train=fed.clients_per_round / fed.clients, fraction_evaluate=0.0,
                              min_train_nodes=fed.clients_per_round, min_evaluate_nodes=0,
                              min_available_nodes=fed.clients,
                              weighted_by_key="unit-weight" if client_dp else "num-examples")
    strategy = FedProx(proximal_mu=fed.mu, **kw) if fed.strategy == "fedprox" else FedAvg(**kw)
    if client_dp:
        strategy = DifferentialPrivacyServerSideFixedClipping(strategy, noise, fed.clip, fed.clients_per_round)
    return strategy


@dataclass
class ServerSide:
    """What the server holds: the base model under the global weights and its own held-out batches (val each
    round, test at the end). It never holds a client's shard (the shards in `data` are dropped on loading)."""

    cfg: FederatedRunConfig
    model: torch.nn.Module
    data: FederatedData
    noise: float  # the DP noise multiplier (per-example DP: the largest any client uses)
    delta: float  # the δ epsilon is reported for (per-example DP: the weakest client's)

    @classmethod
    def prepare(cls, cfg: FederatedRunConfig) -> ServerSide:
        """Load the base model and the held-out data; every bad-input error (too many clients, a bad split, an
        unreachable epsilon) is raised here, before anything is written."""
        noise = resolve_noise(cfg)
        base = load_model(cfg.finetune.base, seed=cfg.train.seed)
        cfg.model = base.cfg
        cfg.finetune.max_length = min(cfg.finetune.max_length, base.cfg.block_size)
        data = load_federated_data(cfg, base.tokenizer, cfg.finetune.max_length)
        if cfg.federated.dp and cfg.federated.dp_level == "example":  # an unreachable epsilon fails here
            plans = [example_privacy(cfg, shard) for shard in data.clients]
            noise, delta = max(p.noise for p in plans), max(p.delta for p in plans)
        else:
            delta = cfg.federated.dp_delta
        data.clients = []  # the server keeps no client's data, not even in a simulation on one machine
        return cls(cfg, build_model(cfg, base, data.labels).eval(), data, noise, delta)


def round_row(side: ServerSide, rnd: int, figures: dict[str, float], traffic: dict[str, float]) -> dict[str, Any]:
    """One line of rounds.jsonl: who trained, what travelled, how good the global model is, privacy spent."""
    fed = side.cfg.federated
    row: dict[str, Any] = {"round": rnd, "clients": int(traffic.get("clients", 0)),
                           "train_loss": traffic.get("train_loss"), "val_loss": figures["loss"]}
    if fed.task == "classify":
        row |= {"accuracy": figures["accuracy"], "macro_f1": figures["macro_f1"]}
    else:
        row["perplexity"] = figures["perplexity"]
    down, up = int(traffic.get("bytes_down", 0)), int(traffic.get("bytes_up", 0))
    row |= {"bytes_sent": down + up, "bytes_down": down, "bytes_up": up}
    if fed.dp and fed.dp_level == "example":  # the clients' own accountants, the worst one
        row |= {"epsilon": traffic.get("epsilon", 0.0), "delta": side.delta, "noise_multiplier": side.noise}
    elif fed.dp:
        eps = epsilon_spent(side.noise, fed.clients_per_round / fed.clients, rnd, side.delta)
        row |= {"epsilon": eps if math.isfinite(eps) else None, "delta": side.delta,
                "noise_multiplier": side.noise}
    return row


def serve(grid: Grid, side: ServerSide, out: Path, quiet: bool = True) -> list[dict[str, Any]]:
    """Run the rounds on `grid` and write the run folder; returns the rows of rounds.jsonl."""
    from tqdm.auto import tqdm


    cfg, fed = side.cfg, side.cfg.federated
    random.seed(fed.seed)  # Flower samples clients with python's random and draws DP noise from numpy's
    np.random.seed(fed.seed % (1 << 32))
    counting = CountingGrid(grid)
    initial = trainable_state(side.model)
    counting.expected = {k: (tuple(v.shape), str(v.numpy().dtype)) for k, v in initial.items()}
    recorder = Recorder(cfg, side.model, side.data, out)
    bar = tqdm(total=fed.rounds, desc="rounds", unit="round", disable=quiet)

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        load_trainable(side.model, arrays.to_torch_state_dict())
        figures = evaluate_global(side.model, side.data, "val")
        row = round_row(side, rnd, figures, {**counting.round, "epsilon": counting.epsilon} if rnd else {})
        recorder.record(row, arrays)
        if rnd:
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.4g}" for k in ("accuracy", "val_loss", "epsilon") if row.get(k)})
        return MetricRecord({k: v for k, v in row.items() if isinstance(v, (int, float))})

    try:
        result = make_strategy(cfg, side.noise).start(
            grid=counting, initial_arrays=ArrayRecord(initial), num_rounds=fed.rounds, evaluate_fn=evaluate_fn,
            train_config=ConfigRecord({"local-steps": fed.local_steps}))
    finally:
        bar.close()
    load_trainable(side.model, result.arrays.to_torch_state_dict())
    recorder.finish()
    return recorder.rows


def server_main(grid: Grid, context: Context) -> None:
    """The ServerApp's body, as `flower-superlink` runs it: the recipe and the run folder come from the run
    config."""
    cfg = _recipe(context)
    out = context.run_config.get("out")
    if not isinstance(out, str) or not out:
        raise ConfigError("Flower run config: `out` (the run folder to write) is missing")
    serve(grid, ServerSide.prepare(cfg), Path(out), quiet=bool(context.run_config.get("quiet", True)))


server_app = ServerApp()
server_app.main()(server_main)
