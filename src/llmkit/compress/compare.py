"""`llmkit compare`: what compression cost and what it bought, llama.cpp's quantisation report for any models.

For each model, on the same tokens: size on disk, decode tokens/s at batch 1, perplexity, ΔPPL against the first
model, the mean KL divergence KL(P_first || P_model) over every predicted position, and how often both put the
same token on top. Perplexity alone hides damage that averages out; KL and same-top-token see each position.

The first model is the reference. Its log-probabilities (every position x the whole vocabulary, float32) go to a
temporary memory-mapped file, so the others are compared one at a time and at most two models' worth of memory is
ever used (4,096 positions of a 49,152-token vocabulary: 0.8 GB on disk, in the page cache while it runs).
Perplexity uses `llmkit eval`'s windows (non-overlapping, every token predicted once, BOS first where the model
wants it), so with the same context it equals `llmkit eval`'s on the same data.
"""

from __future__ import annotations

import gc
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import ConfigError
from llmkit.infer.api import LLM
from llmkit.infer.evaluate import token_stream
from llmkit.infer.generate import SamplingConfig, generate
from llmkit.infer.load import load_model
from llmkit.interop.hf_folder import read_hf_tokenizer
from llmkit.interop.registry import BUILTIN_MODELS, builtin_source, locate

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
ModelSpec = str | Path | tuple[str | Path, str]  # a source, or (source, dtype) to override the dtype for one


def weights_bytes(src: str | Path) -> int:
    """Size on disk of a model's weights: the file itself (.gguf), or the weight files at the top of a folder
    (model.safetensors and any quantisation tensors; not checkpoints/, the tokenizer or config); a built-in name
    counts the packaged file it is read from."""
    p = Path(src)
    if not p.exists() and str(src) in BUILTIN_MODELS:
        p = builtin_source(str(src))
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def _spec(m: ModelSpec, dtype: str) -> tuple[str, str, str]:
    """(source, dtype, display name) of one --model."""
    src, dt = (m if isinstance(m, tuple) else (m, dtype))
    name = str(src) if dt == dtype else f"{src} ({dt})"
    return str(src), dt, name


class _Reference:
    """The first model's log-probabilities and top tokens at every predicted position, on disk."""

    def __init__(self, folder: Path, positions: int, vocab: int) -> None:
        self.logp = np.lib.format.open_memmap(folder / "ref_logp.npy", mode="w+", dtype=np.float32,
                                              shape=(positions, vocab))
        self.top = np.zeros(positions, dtype=np.int64)


@torch.inference_mode()
def score(llm: LLM, tokens: np.ndarray, context: int, vocab: int, ref: _Reference | None, record: _Reference | None,
          desc: str, quiet: bool) -> dict[str, Any]:
    """Mean NLL over non-overlapping windows; against `ref`, per-position KL and same-top-token; into `record`,
    this model's log-probs (the reference pass)."""
    model, device = llm.model, llm.device
    T = min(context, model.cfg.block_size)
    nll, kls, same, pos = 0.0, [], 0, 0
    for s in tqdm(range(0, len(tokens) - 1, T), desc=desc, unit="window", disable=quiet):
        w = torch.from_numpy(np.asarray(tokens[s:s + T + 1], dtype=np.int64))
        x, y = w[None, :-1].to(device), w[1:].to(device)  # (1, t), (t,)
        logp = torch.log_softmax(model(x).logits[0, :, :vocab].float(), dim=-1)  # (t, V)
        n = len(y)
        nll -= float(logp.gather(1, y[:, None]).sum())
        top = logp.argmax(-1)  # (t,)
        if record is not None:
            record.logp[pos:pos + n] = logp.cpu().numpy()
            record.top[pos:pos + n] = top.cpu().numpy()
        if ref is not None:
            p_ref = torch.from_numpy(np.asarray(ref.logp[pos:pos + n])).to(device)  # (t, V) log P_first
            kls.append((p_ref.exp() * (p_ref - logp)).sum(-1).clamp(min=0).cpu())  # (t,) KL(P_first || P)
            same += int((top.cpu() == torch.from_numpy(ref.top[pos:pos + n])).sum())
        pos += n
    out: dict[str, Any] = {"predicted_tokens": pos, "context": T, "loss": nll / pos,
                           "perplexity": math.exp(min(nll / pos, 50.0))}
    if ref is not None:
        kl = torch.cat(kls).double()
        out.update(kl_divergence=float(kl.mean()), kl_divergence_p99=float(kl.quantile(0.99)),
                   kl_divergence_max=float(kl.max()), same_top_token=100.0 * same / pos)
    return out


def decode_speed(llm: LLM, prompt: list[int], new_tokens: int, reps: int) -> float:
    """Greedy decoding at batch 1, `new_tokens` past a short prompt (no early stop): tokens per second, the best
    of `reps` timed runs after a warm-up (on a shared machine the best run is the one least disturbed)."""
    greedy = SamplingConfig(max_new_tokens=new_tokens, temperature=0)
    generate(llm.model, llm.tokenizer, [prompt], SamplingConfig(max_new_tokens=4, temperature=0), eos_ids=set())
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        out = generate(llm.model, llm.tokenizer, [prompt], greedy, eos_ids=set())[0]
        best = max(best, len(out.token_ids) / (time.perf_counter() - t0))
    return best


def _tokenizer_of(src: str) -> Tokenizer:
    """A model's tokenizer without its weights (the models are checked against each other before any runs)."""
    folder = locate(src, quiet=True)
    if (folder / "config.yaml").is_file():
        return Tokenizer.load(folder / "tokenizer")
    return read_hf_tokenizer(folder)


def check_same_tokenizer(specs: list[tuple[str, str, str]], data: str | Path) -> None:
    """KL and same-top-token compare distributions over the same token ids: every model must have the first
    one's vocabulary (token -> id) and turn `data` into the same ids. A one-line ConfigError otherwise."""
    first = _tokenizer_of(specs[0][0])
    vocab = first.tk.get_vocab(with_added_tokens=True)
    text = Path(data).is_file()
    ids = first.encode(Path(data).read_text(encoding="utf-8")[:200_000]) if text else None
    for src, _, name in specs[1:]:
        tok = _tokenizer_of(src)
        theirs = tok.tk.get_vocab(with_added_tokens=True)
        if theirs != vocab or (text and tok.encode(Path(data).read_text(encoding="utf-8")[:200_000]) != ids):
            how = "other ids or splits" if len(theirs) == len(vocab) else f"{len(theirs):,} vs {len(vocab):,} tokens"
            raise ConfigError(f"--model {name} has a different tokenizer from --model {specs[0][2]} ({how}); "
                              "KL and same-top-token need models that share a tokenizer")


def compare(models: list[ModelSpec], data: str | Path, max_tokens: int = 4096, context: int = 512,
            decode_tokens: int = 64, speed_reps: int = 2, device: str = "cpu", dtype: str = "float32",
            quiet: bool = False) -> list[dict[str, Any]]:
    """One row per model (the first is the reference): model, bytes, size_ratio, perplexity, delta_ppl,
    delta_ppl_pct, kl_divergence (mean, nats), kl_divergence_p99, kl_divergence_max, same_top_token (percent),
    decode_tokens_per_s, speedup, and what was measured on. Models load through `load_model` one at a time.
    `data`: a text file or a prepared data folder (its val split); the first `max_tokens` tokens are scored."""
    if not models:
        raise ConfigError("compare needs at least one --model")
    for key, value in (("--max-tokens", max_tokens), ("--context", context), ("--decode-tokens", decode_tokens),
                       ("--speed-reps", speed_reps)):
        if value < 1 or (key in ("--max-tokens", "--context") and value < 2):
            raise ConfigError(f"{key} must be at least {2 if key in ('--max-tokens', '--context') else 1}, "
                              f"got {value}")
    specs = [_spec(m, dtype) for m in models]
    check_same_tokenizer(specs, data)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="llmkit-compare-") as tmp:
        ref: _Reference | None = None
        for k, (src, dt, name) in enumerate(specs):
            got = load_model(src, device=device, dtype=dt, need="decoder")
            llm = LLM(got.model, got.tokenizer, Path(src))
            if k == 0:
                text_tokens, nbytes, desc = token_stream(llm, data)
                bos = llm.tokenizer.with_bos([])
                tokens = np.concatenate([np.asarray(bos, dtype=np.int64), text_tokens])[:max_tokens]
                if len(tokens) < 2:
                    raise ConfigError(f"{desc}: fewer than 2 tokens, nothing to predict")
                vocab = llm.model.cfg.vocab_size
                positions = sum(min(context, llm.model.cfg.block_size, len(tokens) - 1 - s)
                                for s in range(0, len(tokens) - 1, min(context, llm.model.cfg.block_size)))
                ref = _Reference(Path(tmp), positions, vocab)
                stats = score(llm, tokens, context, vocab, None, ref, name, quiet)
                stats.update(kl_divergence=0.0, kl_divergence_p99=0.0, kl_divergence_max=0.0, same_top_token=100.0)
            else:
                if llm.model.cfg.vocab_size != vocab:
                    raise ConfigError(f"--model {name}: vocabulary of {llm.model.cfg.vocab_size:,} tokens, the first "
                                      f"model's has {vocab:,}; compare models that share a tokenizer")
                stats = score(llm, tokens, context, vocab, ref, None, name, quiet)
            speed = decode_speed(llm, [int(t) for t in tokens[:16]], decode_tokens, speed_reps)
            rows.append({"model": name, "source": src, "dtype": dt, "bytes": weights_bytes(src), **stats,
                         "decode_tokens_per_s": speed, "data": desc, "data_bytes": nbytes})
            del got, llm
            gc.collect()
        del ref
    base = rows[0]
    for r in rows:
        r["size_ratio"] = r["bytes"] / base["bytes"]
        r["delta_ppl"] = r["perplexity"] - base["perplexity"]
        r["delta_ppl_pct"] = 100.0 * r["delta_ppl"] / base["perplexity"]
        r["speedup"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return rows


COLUMNS = [("model", "{}"), ("MB", "{:.1f}"), ("size", "{:.0%}"), ("tok/s", "{:.1f}"), ("speed", "{:.2f}x"),
           ("PPL", "{:.3f}"), ("ΔPPL", "{:+.3f}"), ("ΔPPL %", "{:+.2f}"), ("KLD", "{:.5f}"),
           ("same top %", "{:.2f}")]


def table(rows: list[dict[str, Any]]) -> str:
    """The report as aligned text columns, like llama.cpp's quantisation table."""
    keys = ["model", "bytes", "size_ratio", "decode_tokens_per_s", "speedup", "perplexity", "delta_ppl",
            "delta_ppl_pct", "kl_divergence", "same_top_token"]
    cells = [[h for h, _ in COLUMNS]]
    for r in rows:
        vals = [r[k] / 1e6 if k == "bytes" else r[k] for k in keys]
        cells.append([fmt.format(v) for (_, fmt), v in zip(COLUMNS, vals)])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    first = rows[0]
    note = (f"{first['predicted_tokens']:,} predicted tokens of {first['data']} (context {first['context']}); "
            f"KLD = mean KL(first || model) in nats; tok/s = greedy decode at batch 1")
    return "\n".join([*lines, note])


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (smaller is better on both)."""
    return [i for i, (a, b) in enumerate(points)
            if not any((c <= a and d <= b) and (c < a or d < b) for c, d in points)]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Two panels sharing the perplexity axis: size on disk and decode speed, each with its Pareto frontier."""
    from llmkit.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110, sharey=True)
    ppl = [r["perplexity"] for r in rows]
    mb = [r["bytes"] / 1e6 for r in rows]
    tps = [r["decode_tokens_per_s"] for r in rows]
    names = [Path(r["source"]).name + ("" if r["dtype"] == rows[0]["dtype"] else f" ({r['dtype']})") for r in rows]
    panels = [(axes[0], mb, tps, "size on disk (MB)", "decode tok/s", [(m, p) for m, p in zip(mb, ppl)]),
              (axes[1], tps, mb, "decode tokens/s at batch 1", "MB", [(-t, p) for t, p in zip(tps, ppl)])]
    for ax, x, colour, xlabel, clabel, pts in panels:
        sc = ax.scatter(x, ppl, c=colour, cmap="viridis", s=60, zorder=3, edgecolors="k")
        front = sorted(pareto(pts), key=lambda i: x[i])
        ax.plot([x[i] for i in front], [ppl[i] for i in front], "--", color="tab:red", lw=1, zorder=2,
                label="Pareto frontier")
        for xi, yi, n in zip(x, ppl, names):
            ax.annotate(n, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        fig.colorbar(sc, ax=ax, label=clabel)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"perplexity ({rows[0]['predicted_tokens']:,} tokens)")
    axes[0].set_title("smaller and lower is better", fontsize=9)
    axes[1].set_title("faster (right) and lower is better", fontsize=9)
    save_figure(fig, path)
