"""HF import/export: llmkit run folders -> HF folders that transformers loads cleanly, and back, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from helpers_convert import chat_tokenizer, make_run_folder
from llmkit.cli.main import main
from llmkit.errors import CheckpointError
from llmkit.infer.generate import SamplingConfig, generate
from llmkit.interop.convert import convert
from llmkit.interop.hf_folder import read_hf_folder
from llmkit.model.weights import load_weights


@pytest.fixture(scope="module")
def chat_tok(corpus_file):
    return chat_tokenizer(corpus_file.read_text()[:100_000])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, chat_tok, data_dir) -> dict[str, Path]:
    """A GPT-2-flavour run trained for a few steps, and a random Llama-flavour run with a padded vocabulary."""
    from conftest import tiny_model_config
    from llmkit.config import DataConfig, RunConfig, TrainConfig
    from llmkit.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("runs")
    cfg = RunConfig(model=tiny_model_config("gpt2"), data=DataConfig(path=str(data_dir), batch_size=4),
                    train=TrainConfig(max_steps=3, eval_interval=0, eval_iters=1, warmup_steps=1, device="cpu",
                                      dtype="float32", log_interval=1))
    pretrain(cfg, root / "gpt2", quiet=True)
    # 300 tokens padded to a multiple of 96 -> 384 rows: the export must drop the padding.
    llama = make_run_folder(root / "llama", "llama", chat_tok, pad_vocab_multiple=96)
    return {"gpt2": root / "gpt2", "llama": llama}


def export(run: Path, out: Path) -> Path:
    assert main(["convert", "--in", str(run), "--out", str(out), "--to", "hf"]) == 0
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_export_loads_in_transformers_with_same_logits_and_text(arch, runs, tmp_path, capfd):
    import llmkit

    hf_dir = export(runs[arch], tmp_path / "hf")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in hf_dir.iterdir()}
    capfd.readouterr()
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    printed = "".join(capfd.readouterr())  # transformers prints a LOAD REPORT table when anything is off
    assert not any(w in printed for w in ("LOAD REPORT", "MISSING", "UNEXPECTED", "MISMATCH")), printed
    lm = llmkit.load(runs[arch], device="cpu")
    vocab = lm.model.cfg.vocab_size
    assert hf.config.vocab_size == vocab and hf.get_input_embeddings().weight.shape[0] == vocab
    x = torch.randint(0, vocab, (2, 24))
    with torch.no_grad():
        diff = (lm.model(x).logits[..., :vocab] - hf.eval()(x).logits).abs().max().item()
    assert diff <= 1e-4
    prompt = lm.tokenizer.encode("ROMEO: my lord")
    ours = generate(lm.model, lm.tokenizer, [prompt], SamplingConfig(max_new_tokens=20, temperature=0))[0]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                         eos_token_id=lm.tokenizer.eos_id, pad_token_id=lm.tokenizer.pad_id)[0, len(prompt):].tolist()
    if theirs and theirs[-1] == lm.tokenizer.eos_id:
        theirs = theirs[:-1]
    assert ours.token_ids == theirs


def test_exported_tokenizer_loads_in_transformers(runs, chat_tok, tmp_path):
    hf_dir = export(runs["llama"], tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert type(tok).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    text = "First Citizen:\nBefore we proceed any further, hear me speak. 1234"
    assert tok(text, add_special_tokens=False)["input_ids"] == chat_tok.encode(text)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    msgs = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        chat_tok.apply_chat_template(msgs)
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert chat_tok.token_to_id("<|im_end|>") in gen["eos_token_id"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_import_of_export_gives_identical_tensors(arch, runs, tmp_path):
    hf_dir = export(runs[arch], tmp_path / "hf")
    back = convert(hf_dir, tmp_path / "back", to="llmkit")
    a, b = load_weights(runs[arch] / "model.safetensors"), load_weights(back / "model.safetensors")
    assert a.keys() == b.keys()
    vocab = read_hf_folder(hf_dir).cfg.vocab_size
    for name in a:
        want = a[name][:vocab] if name in ("embed.weight", "lm_head.weight") else a[name]
        assert torch.equal(want, b[name]), name
    tokenizer_json = "tokenizer/tokenizer.json"
    assert (back / tokenizer_json).read_text() == (runs[arch] / tokenizer_json).read_text()


def test_sharded_hf_folder_imports_and_loads(tmp_path, chat_tok):
    """transformers' own sharded save (index + several files) -> llmkit.load gives the same logits."""
    import llmkit

    cfg = transformers.LlamaConfig(vocab_size=chat_tok.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    chat_tok.save(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    lm = llmkit.load(tmp_path / "hf", device="cpu")
    x = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        assert (lm.model(x).logits - hf(x).logits).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------------------------- bad input


def one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_truncated_safetensors_is_named(runs, tmp_path, capsys):
    hf_dir = export(runs["llama"], tmp_path / "hf")
    f = hf_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = one_line_error(["convert", "--in", str(hf_dir), "--out", str(tmp_path / "x"), "--to", "llmkit"], capsys)
    assert str(f) in err and "truncated" in err
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_unknown_architecture_is_named(runs, tmp_path, capsys):
    hf_dir = export(runs["llama"], tmp_path / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    err = one_line_error(["generate", "--model", str(hf_dir), "--prompt", "hi"], capsys)
    assert "config.json" in err and "mamba" in err


def test_shapes_that_do_not_fit_the_config_are_named(runs, tmp_path, capsys):
    hf_dir = export(runs["llama"], tmp_path / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    err = one_line_error(["convert", "--in", str(hf_dir), "--out", str(tmp_path / "x"), "--to", "llmkit"], capsys)
    assert str(hf_dir) in err and "gate_proj" in err and "shape" in err


def test_run_folder_with_wrong_shapes_is_named(runs, tmp_path, capsys):
    import shutil

    run = Path(shutil.copytree(runs["llama"], tmp_path / "run"))
    text = (run / "config.yaml").read_text().replace("n_embd: 32", "n_embd: 64")
    (run / "config.yaml").write_text(text)
    err = one_line_error(["eval", "--model", str(run), "--data", str(run / "config.yaml")], capsys)
    assert "model.safetensors" in err and "shape" in err


def test_gpt2_without_biases_cannot_be_exported(tmp_path, chat_tok):
    run = make_run_folder(tmp_path / "run", "gpt2", chat_tok, bias=False)
    with pytest.raises(CheckpointError, match="bias"):
        convert(run, tmp_path / "hf", to="hf")


def test_folder_without_weights_is_named(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    err = one_line_error(["convert", "--in", str(tmp_path / "m"), "--out", str(tmp_path / "x"), "--to", "llmkit"],
                         capsys)
    assert "safetensors" in err and str(tmp_path / "m") in err


def test_load_keeps_tied_weights_tied_and_casts_to_bf16(runs):
    import llmkit

    lm = llmkit.load(runs["gpt2"], device="cpu", dtype="bfloat16")
    assert lm.model.cfg.tie_embeddings and lm.model.lm_head.weight is lm.model.embed.weight
    assert lm.model.embed.weight.dtype == torch.bfloat16
    assert lm.generate("ROMEO:", max_new_tokens=3, temperature=0).finish_reason in ("eos", "length")


def test_bare_gpt2_model_checkpoint_imports(tmp_path, chat_tok):
    """The hub's gpt2 weights are a GPT2Model save: no `transformer.` prefix, old attention-mask buffers."""
    from safetensors.torch import save_file

    cfg = transformers.GPT2Config(vocab_size=chat_tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    bare = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    (tmp_path / "m").mkdir()
    save_file(bare, tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg.to_dict()))
    chat_tok.save(tmp_path / "m")
    conv = read_hf_folder(tmp_path / "m")
    assert torch.equal(conv.weights["embed.weight"], hf.transformer.wte.weight)


# --------------------------------------------------------------------------------------------- --out safety


@pytest.mark.parametrize("to", ["llmkit", "hf"])
def test_convert_never_replaces_a_folder_llmkit_did_not_write(runs, tmp_path, capsys, to):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    err = one_line_error(["convert", "--in", str(runs["llama"]), "--out", str(out), "--to", to], capsys)
    assert "thesis.tex" in err and str(out) in err
    assert (out / "thesis.tex").read_text() == "years of work" and [p.name for p in out.iterdir()] == ["thesis.tex"]
    # an HF folder with a user's file next to the weights is not an export either
    hf_dir = export(runs["llama"], tmp_path / "hf")
    (hf_dir / "README.md").write_text("my notes")
    err = one_line_error(["convert", "--in", str(runs["llama"]), "--out", str(hf_dir), "--to", to], capsys)
    assert "README.md" in err and (hf_dir / "README.md").is_file()


def test_convert_replaces_empty_folders_and_its_own_outputs(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    assert (convert(runs["llama"], tmp_path / "empty", to="hf") / "config.json").is_file()
    assert (convert(runs["gpt2"], tmp_path / "empty", to="hf") / "config.json").is_file()  # an export again
    run = convert(runs["llama"], tmp_path / "run", to="llmkit")
    assert (convert(runs["gpt2"], run, to="llmkit") / "config.yaml").read_text().count("arch: gpt2") == 1


# --------------------------------------------------------------------------------------------- what a model is


@pytest.fixture(scope="module")
def not_decoders(tmp_path_factory, corpus_file, chat_tok) -> dict[str, Path]:
    """A BERT encoder run folder and a fine-tuned classifier run folder (random weights)."""
    from helpers_convert import make_classifier_run
    from llmkit.data.wordpiece import train_wordpiece

    root = tmp_path_factory.mktemp("notdec")
    wp = train_wordpiece([corpus_file.read_text()[:50_000]], vocab_size=300)
    return {"encoder": make_run_folder(root / "bert", "bert", wp),
            "classifier": make_classifier_run(root / "clf", "llama", chat_tok)}


@pytest.mark.parametrize("kind", ["encoder", "classifier"])
def test_verbs_that_need_a_decoder_say_what_the_model_is(not_decoders, kind, tmp_path, capsys, monkeypatch):
    import io

    import llmkit

    run = str(not_decoders[kind])
    what = "BERT encoder" if kind == "encoder" else "text classifier (neg, pos)"
    (tmp_path / "t.txt").write_text("some text to score")
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    for argv in (["generate", "--model", run, "--prompt", "hi"],
                 ["eval", "--task", "lm", "--model", run, "--data", str(tmp_path / "t.txt")],
                 ["chat", "--model", run]):
        err = one_line_error(argv, capsys)
        assert what in err and "needs a text generator" in err and run in err, (argv, err)
    if kind == "classifier":  # a classifier run's own eval task: accuracy on labelled data, not on plain text
        err = one_line_error(["eval", "--model", run, "--data", str(tmp_path / "t.txt")], capsys)
        assert "t.txt" in err and ".csv" in err and ".jsonl" in err, err
    with pytest.raises(CheckpointError, match=what.replace("(", r"\(").replace(")", r"\)")):
        llmkit.load(run)


def test_converting_a_classifier_says_what_it_is(not_decoders, tmp_path, capsys):
    run = str(not_decoders["classifier"])
    for to in ("llmkit", "hf"):
        err = one_line_error(["convert", "--in", run, "--out", str(tmp_path / to), "--to", to], capsys)
        assert "text classifier (neg, pos)" in err and "llmkit classify" in err and not (tmp_path / to).exists()


# --------------------------------------------------------------------------------------------- BERT


@pytest.mark.slow
def test_builtin_bert_converts_to_run_folder_and_hf_folder(tmp_path, capfd):
    """all-MiniLM-L6-v2 (a bare BertModel: pooler, no pre-training heads) -> llmkit run folder -> HF folder, and
    HF folder -> HF folder: transformers loads each export with nothing missing or extra and computes the same."""
    from llmkit.interop.registry import builtin_source

    src = builtin_source("all-minilm-l6-v2")
    run = convert(src, tmp_path / "run", to="llmkit")
    exports = [convert(run, tmp_path / "hf", to="hf"), convert(src, tmp_path / "hf2", to="hf")]
    orig = transformers.BertModel.from_pretrained(src).eval()
    orig_tok = transformers.AutoTokenizer.from_pretrained(src)
    texts = ["Hello World! An unbelievably naïve café, 1234 tokens.", "short", "Zürich's [MASK] über-long-word"]
    x = orig_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = orig(**x)
    for hf_dir in exports:
        assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["BertModel"]
        capfd.readouterr()
        model, info = transformers.BertModel.from_pretrained(hf_dir, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        printed = "".join(capfd.readouterr())
        assert not any(w in printed for w in ("LOAD REPORT", "MISSING", "UNEXPECTED")), printed
        with torch.no_grad():
            got = model.eval()(**x)
        assert (got.last_hidden_state - want.last_hidden_state).abs().max().item() <= 1e-5
        assert (got.pooler_output - want.pooler_output).abs().max().item() <= 1e-5
        tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        assert tok(texts)["input_ids"] == orig_tok(texts)["input_ids"]
        assert tok(texts[0], texts[1])["token_type_ids"] == orig_tok(texts[0], texts[1])["token_type_ids"]
        assert (tok.cls_token, tok.sep_token, tok.mask_token, tok.pad_token) == ("[CLS]", "[SEP]", "[MASK]", "[PAD]")


# --------------------------------------------------------------------------------------------- Llama family


def _random_hf(cls, cfg, tmp: Path, tok) -> tuple[torch.nn.Module, Path]:
    """A transformers model with every tensor random (biases and norms too, so a dropped one shows), saved."""
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() == 1 else 0.15)
    model.save_pretrained(tmp)
    tok.save(tmp)
    return model, tmp


def _logits_diff(lm, hf: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (lm.model(x).logits[..., : hf.config.vocab_size] - hf(x).logits).abs().max().item()


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def test_llama3_rope_scaling_matches_transformers_and_survives_conversion(tmp_path, chat_tok):
    import llmkit

    small = dict(vocab_size=chat_tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    cfg = transformers.LlamaConfig(**small, rope_parameters=LLAMA3_ROPE)
    hf, src = _random_hf(transformers.LlamaForCausalLM, cfg, tmp_path / "hf", chat_tok)
    x = torch.randint(0, cfg.vocab_size, (2, 120))  # positions up to 119, far beyond the original 32
    lm = llmkit.load(src, device="cpu")
    assert lm.model.cfg.rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert _logits_diff(lm, hf, x) <= 1e-4
    # the scaling matters: the same weights with plain rotary positions give other logits
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small)).eval()
    plain.load_state_dict(hf.state_dict())
    assert _logits_diff(lm, plain, x) > 1e-2
    # kept by a run folder, written back to config.json
    run = convert(src, tmp_path / "run", to="llmkit")
    assert "rope_type: llama3" in (run / "config.yaml").read_text()
    back = transformers.AutoModelForCausalLM.from_pretrained(convert(run, tmp_path / "back", to="hf")).eval()
    assert back.config.rope_parameters["rope_type"] == "llama3"
    assert _logits_diff(llmkit.load(run, device="cpu"), back, x) <= 1e-4


def test_linear_rope_scaling_matches_transformers(tmp_path, chat_tok):
    import llmkit

    cfg = transformers.LlamaConfig(vocab_size=chat_tok.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                                   rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    hf, src = _random_hf(transformers.LlamaForCausalLM, cfg, tmp_path / "hf", chat_tok)
    assert _logits_diff(llmkit.load(src, device="cpu"), hf, torch.randint(0, cfg.vocab_size, (1, 100))) <= 1e-4


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_qwen2_and_mistral_match_transformers(kind, tmp_path, chat_tok):
    """Qwen2: q/k/v biases, no o_proj bias. Mistral: a sliding window as long as the context is full attention."""
    import llmkit

    small = dict(vocab_size=chat_tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    if kind == "qwen2":
        cls, cfg = transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**small)
    else:
        cls, cfg = transformers.MistralForCausalLM, transformers.MistralConfig(**small, sliding_window=128)
    hf, src = _random_hf(cls, cfg, tmp_path / "hf", chat_tok)
    if kind == "qwen2":
        attn = hf.model.layers[0].self_attn
        assert attn.q_proj.bias.abs().sum() > 0 and attn.o_proj.bias is None
    assert _logits_diff(llmkit.load(src, device="cpu"), hf, torch.randint(0, cfg.vocab_size, (2, 100))) <= 1e-4


def test_unsupported_rope_and_short_sliding_windows_are_named(runs, tmp_path, capsys):
    hf_dir = export(runs["llama"], tmp_path / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    argv = ["convert", "--in", str(hf_dir), "--out", str(tmp_path / "x"), "--to", "llmkit"]
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    assert "rope_type 'yarn' is not supported" in one_line_error(argv, capsys)
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral", "sliding_window": 16}))
    err = one_line_error(argv, capsys)
    assert "mistral sliding_window=16" in err and "max_position_embeddings=64" in err


def test_hf_tokenizer_asks_for_bos_by_config_or_post_processor(runs, tmp_path, chat_tok):
    """add_bos_token in tokenizer_config.json wins; without it, a tokenizer.json post-processor that puts BOS first
    (Llama 3's TemplateProcessing) means the model wants BOS."""
    from tokenizers import processors

    hf_dir = export(runs["llama"], tmp_path / "hf")
    assert not read_hf_folder(hf_dir).tokenizer.add_bos
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({**tc, "add_bos_token": True}))
    assert read_hf_folder(hf_dir).tokenizer.add_bos
    del tc["add_bos_token"]
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(tc))
    tk = chat_tok.tk
    bos = chat_tok.bos_token
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, chat_tok.bos_id)])
    try:
        (hf_dir / "tokenizer.json").write_text(tk.to_str())
    finally:
        tk.post_processor = None
    assert read_hf_folder(hf_dir).tokenizer.add_bos


def test_convert_of_a_run_folder_with_missing_weights_is_one_line(runs, tmp_path, capsys):
    """Found by bench/fuzz.py: a run folder whose weights lack most tensors crashed `convert --to hf`
    (StopIteration in write_hf_folder). Its weights are now checked against its config first."""
    import shutil

    from safetensors.torch import load_file, save_file

    run = Path(shutil.copytree(runs["gpt2"], tmp_path / "run"))
    weights = load_file(str(run / "model.safetensors"))
    save_file({"embed.weight": weights["embed.weight"]}, str(run / "model.safetensors"))
    for to in ("hf", "llmkit"):
        err = one_line_error(["convert", "--in", str(run), "--out", str(tmp_path / f"out-{to}"), "--to", to], capsys)
        assert "model.safetensors" in err and "missing tensor" in err
        assert not (tmp_path / f"out-{to}").exists()
