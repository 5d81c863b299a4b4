"""GGUF export (`llmkit convert --to gguf`): tiny llama and gpt2 run folders -> f16 / q8_0 / q4_0 files -> read back
by llmkit's own GGUF import (and by transformers' independent GGUF reader).

The bound on the logits: the exported file, read back, gives the logits of the SOURCE MODEL WITH ITS MATRICES
ROUNDED BY THE SAME GGML TYPE (`gguf.quants` quantize + dequantize, row blocks of 32) to within 1e-4 — the export
adds no error of its own (names, rotary permutation, transposes, tied head all right) — and that rounding moves
the logits by at most 0.2 % (f16), 2 % (q8_0) and 25 % (q4_0) of the largest logit on these random models.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

from helpers_convert import chat_tokenizer, make_classifier_run, make_run_folder
from llmkit.cli.main import main
from llmkit.errors import CheckpointError
from llmkit.infer.generate import SamplingConfig, generate
from llmkit.interop.gguf import read_gguf, unpermute_rotary
from llmkit.interop.gguf_write import permute_rotary, write_gguf
from llmkit.interop.run_folder import read_run_folder
from llmkit.model import build_model, empty_model
from llmkit.model.weights import load_into

QUANTS = ("f16", "q8_0", "q4_0")
REL_BOUND = {"f16": 2e-3, "q8_0": 2e-2, "q4_0": 0.25}  # max |logit change| / max |logit| from the rounding alone
SHAPES = {  # GQA + untied head + biases (llama); GPT-2 with learned positions (1024: transformers' n_ctx default)
    "llama": dict(n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128, bias=True),
    "gpt2": dict(n_embd=64, n_head=4, block_size=1024),
}


@pytest.fixture(scope="module")
def tok(corpus_file):
    return chat_tokenizer(corpus_file.read_text()[:100_000])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tok) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-export")
    return {arch: make_run_folder(root / arch, arch, tok, **kw) for arch, kw in SHAPES.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory, runs) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("gguf-files")
    return {(arch, q): Path(write_gguf(run, root / f"{arch}-{q}.gguf", quant=q, quiet=True)["path"])
            for arch, run in runs.items() for q in QUANTS}


def load_source(run: Path) -> torch.nn.Module:
    conv = read_run_folder(run)
    model = build_model(conv.cfg)
    load_into(model, conv.weights, run)
    return model.eval()


def load_gguf(path: Path) -> torch.nn.Module:
    conv = read_gguf(path)
    model = empty_model(conv.cfg)
    load_into(model, conv.weights, path, assign=True)
    return model.eval()


def rounded(model: torch.nn.Module, quant: str) -> torch.nn.Module:
    """The source with every matrix rounded as the export's rules say (written independently of the export)."""
    Q = gguf.GGMLQuantizationType
    cfg = model.cfg
    for name, p in model.named_parameters():  # a tied head appears once, as embed.weight
        if p.ndim == 1 or name == "pos_embed.weight":
            continue
        head = name == "lm_head.weight" or (name == "embed.weight" and cfg.tie_embeddings)
        qtype = (Q.F16 if quant == "f16" or p.shape[1] % 32 else
                 Q.Q8_0 if quant == "q8_0" or head else Q.Q4_0)
        w = p.detach().numpy()
        p.data = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape))
    return model


@pytest.mark.parametrize("arch", list(SHAPES))
@pytest.mark.parametrize("quant", QUANTS)
def test_read_back_logits_within_the_quantisation_error(runs, files, tok, arch, quant):
    x = torch.randint(0, tok.vocab_size, (2, 24))
    V = tok.vocab_size
    source = load_source(runs[arch])
    with torch.no_grad():
        exact = source(x).logits[..., :V]
        expected = rounded(source, quant)(x).logits[..., :V]
        got = load_gguf(files[arch, quant])(x).logits[..., :V]
    assert (got - expected).abs().max().item() <= 1e-4  # the export itself adds nothing
    assert (got - exact).abs().max().item() <= REL_BOUND[quant] * exact.abs().max().item()
    assert (got - exact).abs().max().item() > 0  # the file really is rounded (not a float32 copy)


@pytest.mark.parametrize("arch", list(SHAPES))
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_read_back_greedy_text_is_the_same(runs, files, tok, arch, quant):
    def greedy(model: torch.nn.Module) -> list[int]:
        cfg = SamplingConfig(max_new_tokens=24, temperature=0)
        return generate(model, tok, ["ROMEO: what say you"], cfg, eos_ids=set())[0].token_ids

    assert greedy(load_gguf(files[arch, quant])) == greedy(load_source(runs[arch]))


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(SHAPES))
def test_transformers_reads_the_exported_file_the_same(files, tok, arch):
    """transformers' own GGUF reader (llama.cpp's conventions, written independently of llmkit) agrees."""
    import transformers

    path = files[arch, "q8_0"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "ROMEO: Is the day so young? <|im_end|> 1234 naïve"
    assert their_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    x = torch.randint(0, tok.vocab_size, (1, 16))
    with torch.no_grad():
        diff = load_gguf(path)(x).logits[..., :tok.vocab_size] - theirs(x).logits[..., :tok.vocab_size]
    assert diff.abs().max().item() <= 1e-4


def test_gguf_reader_reads_every_field(files, tok, runs):
    path = files["llama", "q4_0"]
    reader = gguf.GGUFReader(str(path))
    values = {name: field.contents() for name, field in reader.fields.items()}  # every field decodes
    cfg = read_run_folder(runs["llama"]).cfg
    assert values["general.architecture"] == "llama"
    assert values["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert values["llama.block_count"] == cfg.n_layer and values["llama.attention.head_count_kv"] == 2
    assert values["llama.rope.dimension_count"] == cfg.head_dim
    assert values["tokenizer.ggml.model"] == "gpt2" and values["tokenizer.ggml.pre"] == "gpt-2"
    assert len(values["tokenizer.ggml.tokens"]) == cfg.vocab_size == tok.vocab_size
    assert values["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert values["tokenizer.chat_template"] == tok.chat_template
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["output.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.bias"] == "F32"
    gpt2 = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(files["gpt2", "q8_0"])).tensors}
    assert gpt2["position_embd.weight"] == "F32" and gpt2["blk.1.attn_qkv.weight"] == "Q8_0"


def test_tokenizer_round_trips(files, tok, corpus_file):
    back = read_gguf(files["gpt2", "f16"]).tokenizer
    text = corpus_file.read_text()[:5000] + " <|im_start|>user\nhi<|im_end|> ∑ 🙂"
    assert back.encode(text) == tok.encode(text) and back.decode(back.encode(text)) == text
    assert (back.eos_token, back.pad_token, back.bos_token) == (tok.eos_token, tok.pad_token, tok.bos_token)
    assert back.chat_template == tok.chat_template


def test_permute_rotary_inverts_the_import():
    w = torch.randn(4 * 8, 5)  # 4 heads of width 8
    assert torch.equal(unpermute_rotary(permute_rotary(w, 4), 4), w)
    assert not torch.equal(permute_rotary(w, 4), w)


def test_cli_convert_to_gguf(runs, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["convert", "--in", str(runs["llama"]), "--to", "gguf", "--quant", "q8_0", "--out", str(out)]) == 0
    assert "GGUF q8_0" in capsys.readouterr().out
    assert read_gguf(out).source["file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary left


def bad_inputs(runs: dict[str, Path], tmp: Path, corpus_file: Path) -> list[tuple[list[str], str]]:
    from llmkit.data.tokenizer import Tokenizer

    char = make_run_folder(tmp / "char", "llama", Tokenizer.train_char([corpus_file.read_text()[:2000]]))
    clf = make_classifier_run(tmp / "clf", "gpt2", chat_tokenizer(corpus_file.read_text()[:20_000]))
    out = str(tmp / "out.gguf")
    return [
        (["--in", str(runs["llama"]), "--to", "gguf", "--out", str(tmp / "out.bin")], "ending in .gguf"),
        (["--in", str(runs["llama"]), "--to", "gguf", "--out", out, "--dtype", "bfloat16"], "--dtype"),
        (["--in", str(runs["llama"]), "--to", "hf", "--out", str(tmp / "hf"), "--quant", "q8_0"], "--quant"),
        (["--in", str(tmp / "missing"), "--to", "gguf", "--out", out], "missing"),
        (["--in", str(char), "--to", "gguf", "--out", out], "byte-level BPE"),
        (["--in", str(clf), "--to", "gguf", "--out", out], "classifier"),
    ]


def test_bad_inputs_are_one_line_errors_and_write_nothing(runs, tmp_path, corpus_file, capsys):
    for args, needle in bad_inputs(runs, tmp_path, corpus_file):
        assert main(["convert", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, err
        assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp")), args
        assert not (tmp_path / "hf").exists()


def test_rope_scaling_is_refused(tok, tmp_path):
    run = make_run_folder(tmp_path / "rs", "llama", tok, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(CheckpointError, match="rope_scaling"):
        write_gguf(run, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_q4_0_file_is_smaller_than_q8_0_than_f16(files):
    f16, q8, q4 = (files["llama", q].stat().st_size for q in QUANTS)
    assert f16 > q8 > q4
