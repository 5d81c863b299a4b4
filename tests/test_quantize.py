"""Weight-only quantisation: the packed kernels against dequantised matmuls, a quantised run folder that every verb
loads with logits close to the source, GPTQ beating round-to-nearest, and bad input refused with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_model_config
from llmkit.cli.main import main
from llmkit.compress.calibration import calibration_ids
from llmkit.compress.gptq import gptq_weight, layer_error
from llmkit.compress.rtn import make_layer, rtn
from llmkit.data.tokenizer import Tokenizer
from llmkit.infer.load import load_model
from llmkit.infer.step import fast_forward
from llmkit.interop.run_folder import Converted, write_run_folder
from llmkit.model import build_model
from llmkit.model.quant import QuantEmbedding, QuantLinear, dequantize, dequantize_state
from llmkit.model.weights import weights_for_save


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), (4, 64)])
def test_quant_linear_matches_dequantised_matmul(bits: int, group: int) -> None:
    lin = nn.Linear(128, 48, bias=True)
    q = make_layer(lin, bits, group, *rtn(lin.weight.detach(), bits, group))
    x = torch.randn(5, 128)
    ref = x @ q.weight.t() + lin.bias  # the dequantised matrix in float32
    y = q(x)
    assert y.shape == (5, 48)
    # The kernels read bfloat16 activations: a relative error of ~2^-8 per product, far below int4's rounding.
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()
    w_err = (q.weight - lin.weight).abs().max()
    step = (lin.weight.max() - lin.weight.min()) / (255 if bits == 8 else 15)
    assert w_err <= step  # round to nearest: within one grid step of the float weight
    assert (x @ lin.weight.t() + lin.bias - y).abs().max() < (0.3 if bits == 4 else 0.02)


def _run_folder(tmp_path: Path, tokenizer_dir: Path, **cfg_kw: object) -> Path:
    cfg = tiny_model_config("llama", **({"n_embd": 64} | cfg_kw))
    model = build_model(cfg)
    out = tmp_path / "src"
    write_run_folder(Converted(cfg, weights_for_save(model), Tokenizer.load(tokenizer_dir), {"format": "test"}), out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("to,tie,method", [("int8", True, "rtn"), ("int4", False, "gptq")])
def test_quantized_folder_loads_close_and_generates(tmp_path, tokenizer_dir, corpus_file, capsys, to: str, tie: bool,
                                                    method: str) -> None:
    src = _run_folder(tmp_path, tokenizer_dir, tie_embeddings=tie)
    out = tmp_path / "q"
    calib = ["--calib", str(corpus_file), "--calib-seqs", "8", "--calib-len", "32"] if method == "gptq" else []
    assert main(["quantize", "--model", str(src), "--to", to, "--group-size", "32", "--method", method, *calib,
                 "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["to"] == to and res["method"] == method and Path(res["out"]) == out
    if method == "gptq":
        assert res["calib_seqs"] == 8 and res["seq_len"] == 32
    base, got = load_model(src), load_model(out)
    layers = [m for m in got.model.modules() if isinstance(m, QuantLinear)]
    assert {m.bits for m in layers if m is not got.model.lm_head} == {8 if to == "int8" else 4}
    assert isinstance(got.model.embed, QuantEmbedding) and got.model.lm_head.bits == 8
    if tie:  # the tied head reads the embedding's own int8 rows: one copy in the file
        assert got.model.lm_head.qweight is got.model.embed.qweight
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = base.model(ids).logits.float()
        step = fast_forward(got.model)  # must leave the quantised layers alone
        y = step(ids).logits.float()
    assert all(isinstance(m, QuantLinear) for m in layers)
    err = (y - ref).abs().max() / ref.abs().max()
    assert err < (0.02 if to == "int8" else 0.15), err
    # the same numbers through the float path: dequantised weights in ordinary Linear layers
    deq = build_model(base.cfg)
    deq.load_state_dict(dequantize_state(got.weights), strict=False)
    with torch.no_grad():
        assert (deq.eval()(ids).logits - y).abs().max() < 0.02 * ref.abs().max()
    assert main(["generate", "--model", str(out), "--prompt", "the", "--max-new-tokens", "5", "--temperature", "0",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 5
    assert main(["eval", "--model", str(out), "--data", str(tokenizer_dir.parent / "missing.txt")]) == 2


def test_gptq_beats_rtn_on_correlated_inputs() -> None:
    torch.manual_seed(1)
    K, N = 128, 64
    mix = torch.randn(K, K) / K**0.5 + torch.eye(K)  # correlated input features of unequal energy
    x = (torch.randn(2048, K) * torch.linspace(0.1, 3, K)) @ mix  # (rows, K)
    w = torch.randn(N, K) * 0.05
    H = 2 * x.t() @ x / len(x)
    for bits, g in ((4, 32), (4, 64), (8, 0)):
        e_rtn = layer_error(w, x, *rtn(w, bits, g))
        e_gptq = layer_error(w, x, *gptq_weight(w, H, bits, g))
        assert e_gptq < 0.8 * e_rtn, (bits, g, e_gptq, e_rtn)


def test_int4_codes_round_trip() -> None:
    w = torch.randn(32, 64)
    q, s, z = rtn(w, 4, 32)
    lin = nn.Linear(64, 32, bias=False)
    ql = make_layer(lin, 4, 32, q, s, z)
    assert torch.equal(dequantize(ql.qweight, ql.scales, ql.zeros), (q - 8) * s.repeat_interleave(32, 1).to(
        torch.bfloat16).float() + z.repeat_interleave(32, 1).to(torch.bfloat16).float())


def _refused(argv: list[str], out: Path, capsys, needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert not out.exists()


def test_bad_input_one_line_nothing_written(tmp_path, tokenizer_dir, capsys) -> None:
    src = _run_folder(tmp_path, tokenizer_dir)
    out = tmp_path / "out"
    base = ["quantize", "--model", str(src), "--out", str(out)]
    _refused(base + ["--to", "int3"], out, capsys, "int3")
    _refused(base + ["--to", "int4", "--group-size", "48"], out, capsys, "48")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _refused(base + ["--to", "int4", "--method", "gptq", "--calib", str(empty)], out, capsys, "empty.txt")
    _refused(base + ["--to", "int4", "--method", "awq2"], out, capsys, "awq2")
    # a group size that does not divide a layer's width (the tiny MLP reads 64-wide inputs, its proj 172)
    cfg_src = _run_folder(tmp_path / "w", tokenizer_dir, n_embd=96)
    _refused(["quantize", "--model", str(cfg_src), "--out", str(out), "--to", "int4", "--group-size", "64"], out,
             capsys, "does not divide")
    q = tmp_path / "q"
    assert main(base[:-1] + [str(q), "--to", "int8", "--quiet"]) == 0
    capsys.readouterr()
    _refused(["quantize", "--model", str(q), "--to", "int4", "--out", str(out)], out, capsys, "already quantised")
    _refused(["convert", "--in", str(q), "--to", "hf", "--out", str(out)], out, capsys, "quantised")


def test_calibration_windows(tokenizer_dir, corpus_file) -> None:
    tok = Tokenizer.load(tokenizer_dir)
    ids = calibration_ids(tok, corpus_file, n_seqs=16, seq_len=32, seed=0)
    assert ids.shape == (16, 32) and ids.dtype == torch.long
    assert torch.equal(ids, calibration_ids(tok, corpus_file, n_seqs=16, seq_len=32, seed=0))
    assert len({tuple(r.tolist()) for r in ids}) == 16
