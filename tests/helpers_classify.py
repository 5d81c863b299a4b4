"""What the classification and federated tests share: a synthetic sentiment set, run folders of tiny untrained
models, and the CLI called in-process."""

import csv
import random

import torch

from llmkit.cli.main import main
from llmkit.config import ModelConfig, RunConfig, TrainConfig, save_yaml
from llmkit.data.tokenizer import Tokenizer
from llmkit.data.wordpiece import train_wordpiece
from llmkit.model import build_model
from llmkit.model.weights import save_weights

POS = "good great wonderful superb moving delightful brilliant".split()
NEG = "bad awful terrible dull boring tedious lifeless".split()
FILLER = "the film a story with an actor and plot it was this movie its scenes".split()


def synthetic(n: int = 240, seed: int = 0) -> list[tuple[str, str]]:
    """Alternating neg/pos texts: five filler words and one sentiment word, shuffled."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(FILLER, 5) + [rng.choice(POS if label == "pos" else NEG)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path, rows, header=("text", "label"), delimiter=","):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def save_run(path, cfg: ModelConfig, tok: Tokenizer, objective: str):
    """A run folder of a freshly initialised (seed 0) model: what a base model for fine-tuning looks like."""
    torch.manual_seed(0)
    path.mkdir(parents=True)
    save_yaml(RunConfig(model=cfg, train=TrainConfig(objective=objective)), path / "config.yaml")
    save_weights(build_model(cfg), path / "model.safetensors")
    tok.save(path / "tokenizer")
    return path


def tiny_bert_run(path, corpus_file):
    """A 2-layer BERT over a WordPiece vocabulary that holds the synthetic set's words."""
    tok = train_wordpiece([corpus_file.read_text()[:50_000], " ".join(POS + NEG + FILLER)], vocab_size=300)
    cfg = ModelConfig(arch="bert", vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)
    return save_run(path, cfg, tok, "mlm")


def run_cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err
