"""`llmkit explain` beside the peers a user would stitch together, on the same weights and the same token ids:
transformers (eager attention, `output_attentions` / `output_hidden_states`, the logit lens by hand) and Captum's
LayerIntegratedGradients on the Hugging Face model.

    python bench/explain.py                       # prints ONE JSON object
    python bench/explain.py --classifier runs/sentiment --ig-steps 32 --long-ig-steps 8 --long-tokens 1024

What it measures, on SmolLM2-135M-Instruct (the built-in, exported with `llmkit convert --to hf` for the peer):
  - time and peak memory of attention, the logit lens and integrated gradients, for "The capital of France is"
    and for a >= 1,000-token Shakespeare passage. Every (implementation, method, input) runs in a fresh process;
    once the model is loaded, one warm-up forward over the input pages the weights in (else the first method
    timed pays for it), then the peak is the process's resident-set high-water mark, reset there
    (/proc/self/clear_refs), minus the resident set at that moment: the method's own memory, loading excluded;
  - agreement: largest attention difference, share of logit-lens cells with the same top token, integrated-
    gradients difference and completeness (sum of attributions vs f(x) - f(baseline));
  - the layer at which the logit lens first puts " Paris" on top after "The capital of France is";
  - for a sentiment classifier (a MiniLM fine-tuned with `llmkit finetune`, trained here for one epoch when no
    --classifier is given): the top-attributed tokens of 10 held-out test reviews, and whether they are sentiment
    words (VADER's lexicon, shipped in the same vaderSentiment sdist as the reviews).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
METHODS = ("attention", "logit-lens", "integrated-gradients")
DEFAULT_CLASSIFIER = ROOT / "runs" / "explain-sentiment"


# --------------------------------------------------------------------------------------------- memory


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak() -> int:
    """Reset this process's resident-set high-water mark (Linux >= 4.0); returns the resident set now, KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def peak_mib(baseline_kib: int) -> float:
    return round((_status_kib("VmHWM") - baseline_kib) / 1024, 1)


# --------------------------------------------------------------------------------------------- one measurement


def measure_llmkit(method: str, text: str, ig_steps: int, save: Path) -> dict[str, Any]:
    """`explain()` with one method; the peak counts from the moment the model is loaded."""
    import llmkit.explain.report as report_mod

    load = report_mod.load_subject
    mark: dict[str, int] = {}

    def load_then_reset(*a: Any, **k: Any) -> Any:
        import torch

        from llmkit.explain.capture import tokenize

        subject = load(*a, **k)
        with torch.no_grad():
            subject.backbone(torch.tensor([tokenize(subject, text)]), logits_slice=slice(-1, None))  # warm-up
        mark["rss"] = reset_peak()
        return subject

    report_mod.load_subject = load_then_reset
    t0 = time.perf_counter()
    rep = report_mod.explain(MODEL, text, methods=[method], ig_steps=ig_steps)
    wall = time.perf_counter() - t0
    peak = peak_mib(mark["rss"])
    tm = rep["timings"]
    out = {"method_s": round(tm[method], 3), "forward_s": round(tm["forward"], 3),
           "total_s": round(wall - tm["load"], 3), "peak_mib": peak, "tokens": len(rep["token_ids"]),
           "token_ids": rep["token_ids"], "target_id": rep["target"]["id"]}
    if method == "attention":
        np.save(save / "attention.npy", np.stack(rep["_arrays"]["attentions"]))  # (L, H, T, T)
    if method == "logit-lens":
        np.save(save / "lens_top.npy", np.array([[c["id"] for c in row] for row in rep["logit_lens"]]))
        out["lens_layer_of_target"] = rep["lens_layer_of_target"]
    if method == "integrated-gradients":
        a = rep["attributions"]
        np.save(save / "ig.npy", np.array(a["integrated_gradients"]))
        out.update({k: a[k] for k in ("ig_delta", "f_x", "f_baseline", "ig_batch")})
    return out


def measure_hf(method: str, hf_dir: Path, ids: list[int], target: int, baseline: list[int], ig_steps: int,
               ig_batch: int | None, save: Path) -> dict[str, Any]:
    """The same method the way a transformers + Captum user writes it."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(method == "integrated-gradients")
    impl = "sdpa" if method == "integrated-gradients" else "eager"  # eager is needed only for the weights
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation=impl).eval()
    model.requires_grad_(False)
    x = torch.tensor([ids])  # (1, T)
    with torch.no_grad():
        model(x, logits_to_keep=1)  # warm-up, as on the llmkit side
    rss = reset_peak()
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if method == "attention":
        att = torch.stack(model(x, output_attentions=True).attentions)[:, 0]  # (L, H, T, T)
        elapsed = time.perf_counter() - t0
        np.save(save / "attention.npy", att.numpy())
    elif method == "logit-lens":
        hs = model(x, output_hidden_states=True).hidden_states  # L + 1 x (1, T, C); the last one already normed
        tops, top5 = [], []
        for i, h in enumerate(hs):
            logits = model.lm_head(h if i == len(hs) - 1 else model.model.norm(h))[0]  # (T, V)
            p, idx = torch.softmax(logits, -1).topk(5, dim=-1)  # (T, 5)
            tops.append(idx[:, 0].numpy())
            top5.append([[[int(j), float(q)] for j, q in zip(ii, pp)] for ii, pp in zip(idx, p)])
        elapsed = time.perf_counter() - t0
        np.save(save / "lens_top.npy", np.stack(tops))
    else:
        from captum.attr import LayerIntegratedGradients

        def f(batch: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B,) log-probability of the target
            return torch.log_softmax(model(batch, logits_to_keep=1).logits[:, -1], -1)[:, target]

        lig = LayerIntegratedGradients(f, model.model.embed_tokens)
        attr, delta = lig.attribute(x, baselines=torch.tensor([baseline]), n_steps=ig_steps,
                                    internal_batch_size=ig_batch, return_convergence_delta=True)  # (1, T, C)
        elapsed = time.perf_counter() - t0
        np.save(save / "ig.npy", attr[0].sum(-1).detach().numpy())
        out["ig_delta"] = float(delta.item())
    return {"method_s": round(elapsed, 3), "peak_mib": peak_mib(rss), **out}


def child(args: argparse.Namespace) -> None:
    spec = json.loads(args.child)
    save = Path(spec["save"])
    if spec["impl"] == "llmkit":
        got = measure_llmkit(spec["method"], spec["text"], spec["ig_steps"], save)
    else:
        got = measure_hf(spec["method"], Path(spec["hf_dir"]), spec["ids"], spec["target"], spec["baseline"],
                         spec["ig_steps"], spec["ig_batch"], save)
    print(json.dumps(got))


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    Path(spec["save"]).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=3600)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- the comparison


def long_text(n_tokens: int) -> str:
    """A Shakespeare passage of at least n_tokens SmolLM2 tokens."""
    from llmkit.data.corpora import corpus_documents
    from llmkit.interop.sources import read_any

    tok = read_any(MODEL).tokenizer
    text = next(iter(corpus_documents("shakespeare")))[1][5_000:]
    chars = 4 * n_tokens
    while len(tok.encode(text[:chars])) < n_tokens:
        chars = int(chars * 1.2)
    return text[:chars]


def compare(work: Path, name: str, llm: dict[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    """How far the two implementations' numbers are apart, per method."""
    got: dict[str, Any] = {}
    a, b = work / "llmkit" / name, work / "hf" / name
    if (a / "attention.npy").exists() and (b / "attention.npy").exists():
        diff = np.load(a / "attention.npy") - np.load(b / "attention.npy")  # (L, H, T, T)
        got["attention_max_abs_diff"] = float(np.abs(diff).max())
    if (a / "lens_top.npy").exists() and (b / "lens_top.npy").exists():
        same = np.load(a / "lens_top.npy") == np.load(b / "lens_top.npy")  # (L + 1, T)
        got["lens_top1_agreement"] = round(float(same.mean()), 4)
    if (a / "ig.npy").exists() and (b / "ig.npy").exists():
        x, y = np.load(a / "ig.npy"), np.load(b / "ig.npy")
        got["ig_max_abs_diff"] = float(np.abs(x - y).max())
        got["ig_max_abs"] = float(np.abs(x).max())
    ig = llm.get("integrated-gradients", {})
    if "ig_delta" in ig:
        got["ig_completeness_rel_error"] = round(abs(ig["ig_delta"]) / abs(ig["f_x"] - ig["f_baseline"]), 5)
    return got


def benchmark(hf_dir: Path, work: Path, texts: dict[str, str], steps: dict[str, int]) -> dict[str, Any]:
    from llmkit.explain.attribution import baseline_ids
    from llmkit.explain.capture import load_subject

    subject = load_subject(MODEL)
    results: dict[str, Any] = {}
    for name, text in texts.items():
        ig_steps = steps[name]
        llm = {m: run_child({"impl": "llmkit", "method": m, "text": text, "ig_steps": ig_steps,
                             "save": str(work / "llmkit" / name)}) for m in METHODS}
        print(f"[bench] llmkit {name}: " + json.dumps({m: {k: v for k, v in r.items() if k.endswith(('_s', 'mib'))}
                                                       for m, r in llm.items()}), file=sys.stderr)
        first = llm["attention"]
        ids, target = first["token_ids"], first["target_id"]
        import torch

        base = baseline_ids(subject, torch.tensor([ids]))[0].tolist()
        ig_batch = llm["integrated-gradients"].get("ig_batch")
        hf = {m: run_child({"impl": "hf", "method": m, "hf_dir": str(hf_dir), "ids": ids, "target": target,
                            "baseline": base, "ig_steps": ig_steps, "ig_batch": ig_batch,
                            "save": str(work / "hf" / name)}) for m in METHODS}
        print(f"[bench] peer {name}: " + json.dumps(hf), file=sys.stderr)
        for r in llm.values():
            r.pop("token_ids", None)
        results[name] = {"tokens": len(ids), "ig_steps": ig_steps, "llmkit": llm, "transformers+captum": hf,
                         "agreement": compare(work, name, llm, hf)}
    return results


def paris_layer() -> dict[str, Any]:
    from llmkit.explain import explain

    rep = explain(MODEL, PROMPT, methods=["logit-lens"], target=" Paris")
    rows = [{"layer": i, "top": row[-1]["token"], "p": row[-1]["prob"], "paris_rank": row[-1]["target_rank"]}
            for i, row in enumerate(rep["logit_lens"])]
    return {"prompt": PROMPT, "target": rep["target"], "first_layer_paris_on_top": rep["lens_layer_of_target"],
            "n_layer": rep["n_layer"], "last_position_per_layer": rows}


# --------------------------------------------------------------------------------------------- sentiment


def vader_lexicon() -> set[str]:
    from llmkit.data.labelled import data_dirs

    for d in data_dirs():
        for sdist in d.glob("vaderSentiment-*.tar.gz"):
            with tarfile.open(sdist) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith("vaderSentiment/vader_lexicon.txt"))
                lines = tar.extractfile(member).read().decode("utf-8", "replace").splitlines()
            return {line.split("\t")[0].lower() for line in lines if line.strip()}
    return set()


def sentiment(classifier: Path, ig_steps: int, n: int = 10, top: int = 3) -> dict[str, Any]:
    """Top-attributed tokens (integrated gradients, toward the predicted class) of n held-out test reviews,
    half positive, half negative."""
    from llmkit.data.labelled import movie_reviews, split
    from llmkit.explain import explain

    if not (classifier / "model.safetensors").is_file():
        cmd = [sys.executable, "-m", "llmkit.cli.main", "finetune", "--config", "configs/classify-minilm.yaml",
               "--epochs", "1", "--quiet", "--out", str(classifier)]
        print("$ " + " ".join(cmd[2:]), file=sys.stderr)
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    test = split(movie_reviews())["test"]
    labels = sorted(set(test.labels))
    picked = [i for lab in labels for i in [j for j, y in enumerate(test.labels) if y == lab][: n // len(labels)]]
    lexicon = vader_lexicon()
    rows, hits, correct = [], 0, 0
    for i in picked:
        rep = explain(str(classifier), test.texts[i], methods=["integrated-gradients"], ig_steps=ig_steps)
        a, toks = rep["attributions"]["integrated_gradients"], rep["tokens"]
        best = sorted(range(len(a)), key=lambda k: -a[k])[:top]
        words = [toks[k] for k in best]
        sentiment_words = [w for w in words if w.removeprefix("##").lower() in lexicon]
        hits += bool(sentiment_words)
        correct += rep["target"]["label"] == test.labels[i]
        rows.append({"text": test.texts[i], "gold": test.labels[i], "predicted": rep["target"]["label"],
                     "p": rep["target"]["probability"],
                     "top_tokens": [[w, round(a[k], 4)] for w, k in zip(words, best)],
                     "vader_words_in_top": sentiment_words})
    return {"classifier": str(classifier), "reviews": rows, "correct": f"{correct}/{len(rows)}",
            "reviews_whose_top3_has_a_vader_word": f"{hits}/{len(rows)}"}


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER,
                    help="fine-tuned sentiment run folder (trained here, one epoch of MiniLM, when missing)")
    ap.add_argument("--ig-steps", type=int, default=32, help="integrated-gradients steps, both implementations")
    ap.add_argument("--long-ig-steps", type=int, default=8, help="integrated-gradients steps on the long input "
                    "(each step is a forward and backward pass over all its tokens)")
    ap.add_argument("--long-tokens", type=int, default=1024, help="at least this many tokens in the long input")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: speed, paris, sentiment")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    skip = set(filter(None, args.skip.split(",")))
    import torch

    result: dict[str, Any] = {"bench": "explain", "model": MODEL, "threads": torch.get_num_threads(),
                              "ig_steps": args.ig_steps}
    if "paris" not in skip:
        result["paris"] = paris_layer()
        print("[bench] paris: " + json.dumps(result["paris"]), file=sys.stderr)
    if "sentiment" not in skip:
        result["sentiment"] = sentiment(args.classifier, args.ig_steps)
        print("[bench] sentiment: " + json.dumps(result["sentiment"]), file=sys.stderr)
    if "speed" not in skip:
        from llmkit.interop.convert import convert

        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = convert(MODEL, Path(tmp) / "hf", to="hf")
            texts = {"short": PROMPT, "long": long_text(args.long_tokens)}
            steps = {"short": args.ig_steps, "long": args.long_ig_steps}
            result["speed"] = benchmark(hf_dir, Path(tmp) / "work", texts, steps)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
