"""One federated experiment on one machine: `llmkit federated` -> Flower's ServerApp and ClientApp -> run folder.

Two engines run the same apps. `local` (the default) is a Flower Grid that hands each Message to the ClientApp
in this process, one node after another, after a round trip through Flower's own wire format (protobuf): the
clients receive exactly what a SuperNode would, and only what a reply holds comes back. One process, no startup
cost, memory flat over any number of rounds: on a 2-core machine it is the one that fits. `simulation` is Flower's
simulation runtime (`flwr.simulation.run_simulation`, Ray actors): measured here on 2 cores it took ~30 s before
the first round, ~2 GB across its processes and lost a worker process once, so it is there for many-core boxes.
Across machines the same apps run under `flower-superlink` / `flower-supernode` (see apps.py).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from llmkit.federated.apps import ServerSide, client_app, recipe_text, serve
from llmkit.federated.config import FederatedRunConfig
from llmkit.federated.record import check_out_dir, clear_out_dir

RUN_ID = 1


class LocalGrid(Grid):
    """Flower's Grid for clients in this process: every Message goes through protobuf both ways and each node
    keeps its own Context (its partition, its state) from round to round."""

    def __init__(self, app: ClientApp, nodes: int, run_config: dict[str, Any]) -> None:
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity

        # Flower stamps every Message with the identity of the task that creates it (as run_simulation does).
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
        self.app, self._run = app, Run.create_empty(RUN_ID)
        self.contexts = {n + 1: Context(run_id=RUN_ID, node_id=n + 1, state=RecordDict(), run_config=run_config,
                                        node_config={"partition-id": n, "num-partitions": nodes})
                         for n in range(nodes)}

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid delivers with send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid delivers with send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_run_id"] = RUN_ID
            reply = self.app(wire(msg), self.contexts[msg.metadata.dst_node_id])
            replies.append(wire(reply))
        return replies


def wire(msg: Message) -> Message:
    """The message as the other side would receive it: serialised to Flower's protobuf and parsed back."""
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage  # type: ignore[attr-defined]

    return message_from_proto(ProtoMessage.FromString(message_to_proto(msg).SerializeToString()))


def run_federated(cfg: FederatedRunConfig, out_dir: Path, quiet: bool = False,
                  overwrite: bool = False) -> list[dict[str, Any]]:
    """Run the experiment and write the run folder; returns the rows of rounds.jsonl. Every bad-input error is
    raised before anything is written to `out_dir`."""
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    side = ServerSide.prepare(cfg)  # loads the model and data: too many clients, bad splits, epsilon fail here
    if overwrite:
        clear_out_dir(out)
    run_config = {"recipe": recipe_text(cfg), "out": str(out), "quiet": quiet}
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # Flower logs every round at INFO; the progress bar says it shorter
    try:
        if cfg.federated.engine == "local":
            random.seed(cfg.federated.seed)
            return serve(LocalGrid(client_app, cfg.federated.clients, run_config), side, out, quiet=quiet)
        return _simulate(side, out, run_config, quiet)
    finally:
        flwr_log.setLevel(level)


def _simulate(side: ServerSide, out: Path, run_config: dict[str, Any], quiet: bool) -> list[dict[str, Any]]:
    """The same apps on Flower's simulation runtime (Ray): the clients run in Ray actors (one per 2 CPUs), the
    server in a thread of this process; `run_simulation` has no run config, so the apps get theirs here."""
    from flwr.simulation import run_simulation

    rows: list[dict[str, Any]] = []
    sim_client = ClientApp()

    @sim_client.train()
    def train(msg: Message, context: Context) -> Message:
        ctx = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                      state=context.state, run_config=run_config)  # Flower forbids editing run_config in place
        return client_app(msg, ctx)

    sim_server = ServerApp()

    @sim_server.main()
    def main(grid: Grid, context: Context) -> None:
        rows.extend(serve(grid, side, out, quiet=quiet))

    run_simulation(sim_server, sim_client, num_supernodes=side.cfg.federated.clients,
                   backend_config={"client_resources": {"num_cpus": 2, "num_gpus": 0.0},
                                   "init_args": {"include_dashboard": False}})
    return rows
