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
