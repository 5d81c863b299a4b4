"""Compression acceptance bench (issue 8): quantisation, pruning and GGUF export of SmolLM2-135M-Instruct and of a
demo-like model, measured by one `llmkit compare` run per model family, beside `transformers` fp32 decoding.

Rows per family (JSON lines, `compress.compare` fields plus `family` and `row`): base fp32, llmkit bf16, int8,
int4 rtn, int4 gptq (group --int4-group), prune magnitude 50 %, prune wanda 50 %, structured MLP -40 %
(--structured-sparsity) + recovery, GGUF q8_0 (exported, read back by llmkit's import), then `transformers` fp32
greedy decode tok/s at batch 1 on the same weights (llmkit's HF export of the base) in the same process, a GGUF
check line (every field read by `gguf.GGUFReader`, logits against the source rounded to Q8_0, greedy text) and an
acceptance line with the issue's criteria, sizes against the base's float32 weights (`fp32_bytes` in the family
line). The header line holds the machine (CPU model and flags).

SmolLM2's packaged weights are a Q4_1 GGUF (blocks of 32, Q8_0 embedding) read into float32: that float32 model
is the base, and int4 at group 32 can hold its grid almost exactly (hence the --int4-group default).

Held-out text (none of the models trained on it):
  * smollm2: llmkit's own README.md (written 2025-26, after SmolLM2's training data was collected; its sha256 is
    in the header, since the file changes as the project does). Calibration: the built-in Shakespeare corpus;
    recovery fine-tune: data/shakespeare-smollm2 (Shakespeare in SmolLM2's tokenizer).
  * demo: the val split of data/shakespeare (the demo trains, calibrates and recovers on the train split only).

    python bench/compress.py [--families smollm2,demo] [--demo-run runs/demo] [--max-tokens 4096]
                             [--decode-tokens 64] [--calib-seqs 128] [--recover-steps 60] [--rows int8,...]

Without --demo-run a demo-like model (configs/demo.yaml, --demo-minutes of training) is trained first.
Compressed models are written under --work (runs/bench-compress) and reused by a later run with --reuse.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmkit.cli.main import main as cli_main
from llmkit.errors import LLMKitError
from train_throughput import machine

ROWS = ["base fp32", "llmkit bf16", "int8", "int4 rtn", "int4 gptq", "prune magnitude 50%",
        "prune wanda 50%", "structured mlp + recovery", "gguf q8_0"]


def slug(row: str, int4_group: int) -> str:
    """The folder (or .gguf) name of a row under --work; int4 rows carry their group size."""
    name = row.split(" + ")[0].replace(" ", "-").replace("%", "").replace("--", "-")
    return f"{name}-g{int4_group}" if row.startswith("int4") else name


def emit(rec: dict[str, Any]) -> None:
    print(json.dumps(rec), flush=True)


def llmkit(argv: list[str]) -> int:
    """An `llmkit` command in this process, its report lines on stderr: stdout carries JSON lines only."""
    with contextlib.redirect_stdout(sys.stderr):
        return cli_main(argv)


def family_setup(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Base model, held-out data, calibration and recovery data of one family."""
    if name == "smollm2":
        readme = Path("README.md")
        recover = Path("data/shakespeare-smollm2")
        if not (recover / "meta.json").is_file():
            from llmkit.infer.load import load_model

            tok_dir = Path("data/smollm2-tokenizer")
            if not (tok_dir / "tokenizer.json").is_file():
                load_model("smollm2-135m-instruct").tokenizer.save(tok_dir)
            llmkit(["prepare", "--corpus", "shakespeare", "--tokenizer", str(tok_dir), "--out", str(recover)])
        return {"base": "smollm2-135m-instruct", "data": readme, "calib": None, "recover": recover,
                "data_sha256": hashlib.sha256(readme.read_bytes()).hexdigest()[:16]}
    data = Path("data/shakespeare")
    if not (data / "meta.json").is_file():
        llmkit(["tokenizer", "train", "--corpus", "shakespeare", "--kind", "bpe", "--vocab-size", "4096", "--out",
                "data/shakespeare-tokenizer"])
        llmkit(["prepare", "--corpus", "shakespeare", "--tokenizer", "data/shakespeare-tokenizer", "--out", str(data)])
    base = Path(args.demo_run) if args.demo_run else args.work / "demo" / "model"
    if not args.demo_run and not (base / "model.safetensors").is_file():
        rc = llmkit(["pretrain", "--config", "configs/demo.yaml", "--out", str(base), "--quiet", "--overwrite",
                     "--train.max_minutes", str(args.demo_minutes)])
        if rc:
            raise SystemExit(f"training the demo-like model failed (exit {rc})")
    return {"base": str(base), "data": data, "calib": str(data), "recover": data, "data_sha256": None}


def builders(fam: dict[str, Any], args: argparse.Namespace) -> dict[str, Callable[[Path], Any]]:
    """How each compressed row is made from the family's base, through the quantize / prune / GGUF APIs."""
    from llmkit.compress.prune import PruneSpec, prune_model
    from llmkit.compress.quantize import QuantSpec, quantize
    from llmkit.interop.gguf_write import write_gguf

    base, calib, q = fam["base"], fam["calib"], dict(quiet=args.quiet)

    def quant(**kw) -> Callable[[Path], Any]:
        if kw.get("method") == "gptq":
            kw.update(calib=calib, calib_seqs=args.calib_seqs)
        return lambda out: quantize(base, out, QuantSpec(**kw), **q)

    def prune(method: str, sparsity: float, **kw) -> Callable[[Path], Any]:
        spec = PruneSpec(method=method, sparsity=sparsity, calib_seqs=args.calib_seqs,
                         calib=calib if method != "magnitude" else None)
        return lambda out: prune_model(base, spec, out, device="cpu", **kw, **q)

    return {
        "int8": quant(to="int8"),
        "int4 rtn": quant(to="int4", group_size=args.int4_group, method="rtn"),
        "int4 gptq": quant(to="int4", group_size=args.int4_group, method="gptq"),
        "prune magnitude 50%": prune("magnitude", 0.5),
        "prune wanda 50%": prune("wanda", 0.5),
        "structured mlp + recovery": prune("structured", args.structured_sparsity, recover_steps=args.recover_steps,
                                                data=str(fam["recover"])),
        "gguf q8_0": lambda out: write_gguf(base, out, quant="q8_0", quiet=args.quiet),
    }


def make_rows(family: str, fam: dict[str, Any], args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(row, model spec for compare) for every row that could be made; a row that could not is reported."""
    specs: list[tuple[str, Any]] = [("base fp32", fam["base"])]
    if "llmkit bf16" in args.rows:
        specs.append(("llmkit bf16", (fam["base"], "bfloat16")))
    try:
        make = builders(fam, args)
    except ImportError as e:  # quantize / prune not there yet
        emit({"family": family, "skipped": "quantize/prune rows", "why": f"{type(e).__name__}: {e}"})
        make = {}
    for row in ROWS[2:]:
        if row not in args.rows:
            continue
        out = args.work / family / (slug(row, args.int4_group) + (".gguf" if row.startswith("gguf") else ""))
        done = out.is_file() if out.suffix == ".gguf" else (out / "model.safetensors").is_file()
        if not (args.reuse and done):
            if row not in make:
                continue
            t0 = time.perf_counter()
            try:
                made = make[row](out)
            except (LLMKitError, NotImplementedError, ImportError) as e:
                emit({"family": family, "row": row, "skipped": True, "why": f"{type(e).__name__}: {e}"})
                continue
            report = {k: v for k, v in (made or {}).items() if isinstance(v, (int, float, str, bool))}
            emit({"family": family, "row": row, "made": str(out), "seconds": round(time.perf_counter() - t0, 1),
                  "report": report})
        specs.append((row, str(out)))
    return specs


@torch.inference_mode()
def transformers_decode(base: str, prompt: list[int], args: argparse.Namespace, work: Path) -> float:
    """transformers' greedy decode at batch 1, fp32, on llmkit's HF export of the same weights: tokens/s, best
    of --speed-reps after a warm-up (the same protocol as compare's)."""
    import transformers

    from llmkit.interop.convert import convert

    hf_dir = convert(base, work / "hf-base", to="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # decode the full length, as llmkit does here
    x = torch.tensor([prompt])  # (1, T)
    kw = dict(do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)
    hf.generate(x, max_new_tokens=4, **kw)
    best = 0.0
    for _ in range(args.speed_reps):
        t0 = time.perf_counter()
        out = hf.generate(x, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, **kw)
        best = max(best, (out.shape[1] - x.shape[1]) / (time.perf_counter() - t0))
    return best


def heldout_ids(base: str, data: Path) -> tuple[Any, Any]:
    """The base's loaded model and the held-out token ids as compare reads them (BOS first where wanted)."""
    import numpy as np

    from llmkit.infer.api import LLM
    from llmkit.infer.evaluate import token_stream
    from llmkit.infer.load import load_model

    got = load_model(base)
    ids = token_stream(LLM(got.model, got.tokenizer, Path(base)), data)[0]
    return got, np.concatenate([np.asarray(got.tokenizer.with_bos([]), dtype=np.int64), ids.astype(np.int64)])


def heldout_prompt(base: str, data: Path) -> list[int]:
    """The 16-token prompt compare's decode timing uses."""
    return [int(t) for t in heldout_ids(base, data)[1][:16]]


@torch.inference_mode()
def gguf_check(base: str, path: Path, data: Path) -> dict[str, Any]:
    """The GGUF acceptance: every field decodes; llmkit's import of the file against the source rounded to Q8_0
    (the export must add nothing: bound 1e-3 on the logits) and against the source; the same greedy text."""
    import gguf

    from llmkit.infer.generate import SamplingConfig, generate
    from llmkit.infer.load import load_model
    from llmkit.interop.gguf_write import round_like_export

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    src, ids = heldout_ids(base, data)
    back = load_model(path)
    ids = ids[:256]
    x = torch.from_numpy(ids)[None]  # (1, T)
    V = src.cfg.vocab_size
    got, exact = back.model(x).logits[..., :V], src.model(x).logits[..., :V]
    greedy = SamplingConfig(max_new_tokens=64, temperature=0)
    prompt = [ids[:16].tolist()]

    def text(model: torch.nn.Module) -> list[int]:
        return generate(model, src.tokenizer, prompt, greedy, eos_ids=set())[0].token_ids

    source_text, back_text = text(src.model), text(back.model)
    rounded_model = round_like_export(src.model, "q8_0")
    rounded = rounded_model(x).logits[..., :V]
    common = next((i for i, (a, b) in enumerate(zip(source_text, back_text)) if a != b), len(back_text))
    return {"fields_read": len(fields), "tensors": len(reader.tensors), "file_bytes": path.stat().st_size,
            "max_abs_logit_diff_vs_q8_0_rounded_source": float((got - rounded).abs().max()),
            "max_abs_logit_diff_vs_source": float((got - exact).abs().max()),
            "max_abs_source_logit": float(exact.abs().max()), "bound_vs_rounded": 1e-3,
            "same_greedy_64_tokens_vs_rounded_source": back_text == text(rounded_model),
            "same_greedy_64_tokens_vs_source": back_text == source_text,
            "greedy_tokens_equal_to_source_before_first_difference": common}


def fp32_bytes(base: str) -> int:
    """What the base's weights take in float32 (tied tensors once): the issue's reference size. The built-in
    SmolLM2 is read from a Q4_1 GGUF, so its packaged file is no measure of the fp32 model."""
    from llmkit.infer.load import load_model
    from llmkit.model.weights import weights_for_save

    return sum(t.numel() * 4 for t in weights_for_save(load_model(base, "cpu", "float32").model).values())


def acceptance(rows: dict[str, dict[str, Any]], hf_tps: float | None, fp32: int) -> dict[str, Any]:
    """The issue's criteria, each as measured (None where a row is missing); sizes against `fp32` bytes."""
    def get(row: str, key: str) -> Any:
        return rows.get(row, {}).get(key)

    def ratio(a: Any, b: Any) -> float | None:
        return a / b if a is not None and b else None

    i8, bf, g4 = "int8", "llmkit bf16", "int4 gptq"
    st = "structured mlp + recovery"
    return {
        "int8_dppl_pct": get(i8, "delta_ppl_pct"), "int8_same_top_token": get(i8, "same_top_token"),
        "int8_vs_transformers_fp32": ratio(get(i8, "decode_tokens_per_s"), hf_tps),
        "int8_vs_llmkit_bf16": ratio(get(i8, "decode_tokens_per_s"), get(bf, "decode_tokens_per_s")),
        "int4_gptq_dppl_pct": get(g4, "delta_ppl_pct"), "int4_gptq_vs_fp32_bytes": ratio(get(g4, "bytes"), fp32),
        "int4_gptq_vs_llmkit_bf16": ratio(get(g4, "decode_tokens_per_s"), get(bf, "decode_tokens_per_s")),
        "int4_rtn_dppl_pct": get("int4 rtn", "delta_ppl_pct"),
        "magnitude_dppl_pct": get("prune magnitude 50%", "delta_ppl_pct"),
        "wanda_dppl_pct": get("prune wanda 50%", "delta_ppl_pct"),
        "structured_dppl_pct": get(st, "delta_ppl_pct"), "structured_vs_fp32_bytes": ratio(get(st, "bytes"), fp32),
        "structured_speedup": get(st, "speedup"),
        "gguf_q8_0_kl": get("gguf q8_0", "kl_divergence"),
        "gguf_q8_0_same_top_token": get("gguf q8_0", "same_top_token"),
    }


def run_family(family: str, args: argparse.Namespace) -> None:
    from llmkit.compress.compare import compare

    fam = family_setup(family, args)
    (args.work / family).mkdir(parents=True, exist_ok=True)
    specs = make_rows(family, fam, args)
    fam["fp32_bytes"] = fp32_bytes(fam["base"])
    emit({"family": family, "base": fam["base"], "fp32_bytes": fam["fp32_bytes"], "held_out": str(fam["data"]),
          "held_out_sha256": fam["data_sha256"], "rows": [r for r, _ in specs]})
    t0 = time.perf_counter()
    rows = compare([m for _, m in specs], fam["data"], max_tokens=args.max_tokens, context=args.context,
                   decode_tokens=args.decode_tokens, speed_reps=args.speed_reps, quiet=args.quiet)
    by_row = {}
    for (row, _), rec in zip(specs, rows):
        by_row[row] = rec
        emit({"family": family, "row": row, **rec})
    hf_tps = None
    if not args.no_transformers:
        hf_tps = transformers_decode(fam["base"], heldout_prompt(fam["base"], fam["data"]), args, args.work / family)
        emit({"family": family, "row": "transformers fp32", "decode_tokens_per_s": hf_tps,
              "note": "transformers generate, greedy, batch 1, same weights (llmkit's HF export), same process"})
    if "gguf q8_0" in by_row:
        check = gguf_check(fam["base"], Path(by_row["gguf q8_0"]["source"]), fam["data"])
        emit({"family": family, "row": "gguf q8_0 check", **check})
    emit({"family": family, "acceptance": acceptance(by_row, hf_tps, fam["fp32_bytes"]),
          "compare_seconds": round(time.perf_counter() - t0, 1)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="smollm2,demo", help="comma-separated: smollm2, demo")
    ap.add_argument("--demo-run", help="a trained demo-like run folder (default: train one for --demo-minutes)")
    ap.add_argument("--demo-minutes", type=float, default=3.0, help="training time of the demo-like model")
    ap.add_argument("--rows", default=",".join(ROWS),
                    help="comma-separated subset of: " + ", ".join(ROWS).replace("%", "%%"))
    ap.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens scored per model")
    ap.add_argument("--context", type=int, default=512, help="scoring window")
    ap.add_argument("--decode-tokens", type=int, default=64, help="tokens per timed decode run")
    ap.add_argument("--speed-reps", type=int, default=3, help="timed decode runs per model (the best counts)")
    ap.add_argument("--calib-seqs", type=int, default=128, help="calibration windows for gptq / wanda / structured")
    ap.add_argument("--structured-sparsity", type=float, default=0.4,
                    help="fraction of the MLP width structured pruning removes (0.4: the file shrinks by >= 20 %% "
                         "on both families, whose tied embeddings and attention stay whole)")
    ap.add_argument("--int4-group", type=int, default=32, choices=(32, 64, 128),
                    help="group size of the int4 rows (32: the grid of SmolLM2's packaged Q4_1 weights)")
    ap.add_argument("--recover-steps", type=int, default=60, help="recovery steps after structured pruning")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-compress"), help="where compressed models go")
    ap.add_argument("--reuse", action="store_true", help="reuse compressed models an earlier run left in --work")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers decode row")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()
    args.rows = [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; valid: {ROWS}")
    emit({**machine(), "bench": "compress", "argv": sys.argv[1:]})
    for family in args.families.split(","):
        run_family(family.strip(), args)


if __name__ == "__main__":
    main()
