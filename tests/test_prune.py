"""`llmkit prune` on tiny Llama-flavour models: magnitude, Wanda, 2:4, structured heads / neurons, recovery."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from helpers_convert import chat_tokenizer, make_run_folder
from llmkit.cli.main import main
from llmkit.compress.prune import PruneSpec, column_norms, prunable_linears, prune_model, prune_unstructured
from llmkit.config import read_run_folder_config
from llmkit.data.tokenizer import Tokenizer
from llmkit.infer.load import load_model
from llmkit.model.weights import load_weights, save_weights

CALIB = dict(calib_seqs=8, calib_len=32)


@pytest.fixture(scope="module")
def chat_tok(corpus_file):
    return chat_tokenizer(corpus_file.read_text()[:100_000])


@pytest.fixture(scope="module")
def llama(tmp_path_factory, chat_tok) -> Path:
    """A random tiny Llama: 2 layers, 4 query heads in 2 KV groups, head_dim 8, MLP width 256."""
    return make_run_folder(tmp_path_factory.mktemp("llama"), "llama", chat_tok)


def prune(src: Path, out: Path, corpus: Path, **kw) -> dict:
    spec = PruneSpec(method=kw.pop("method"), sparsity=kw.pop("sparsity"), calib=str(corpus), **CALIB,
                     **{k: kw.pop(k) for k in ("pattern", "parts") if k in kw})
    return prune_model(str(src), spec, out, device="cpu", quiet=True, **kw)


def linear_weights(run: Path) -> dict[str, torch.Tensor]:
    model = load_model(run, device="cpu").model
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach() for n in prunable_linears(model)}


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_methods_hit_the_sparsity_in_every_layer_and_keep_shapes(method, llama, corpus_file, tmp_path):
    report = prune(llama, tmp_path / "out", corpus_file, method=method, sparsity=0.5)
    before, after = linear_weights(llama), linear_weights(tmp_path / "out")
    assert before.keys() == after.keys() and len(after) == 8
    for name, w in after.items():
        assert w.shape == before[name].shape
        zeros = float((w == 0).float().mean())
        assert abs(zeros - 0.5) < 0.01, (name, zeros)
        kept = w != 0
        assert torch.equal(w[kept], before[name][kept])  # the survivors are untouched
    assert abs(report["zero_fraction_layers"] - 0.5) < 0.01
    assert 0 < report["zero_fraction_model"] < report["zero_fraction_layers"]  # embeddings stay dense
    assert report["params_after"] == report["params_before"]


def test_wanda_keeps_small_weights_on_high_activation_inputs_where_magnitude_drops_them(llama):
    model = load_model(llama, device="cpu").model
    name = "blocks.0.mlp.proj"
    w = dict(model.named_modules())[name].weight
    with torch.no_grad():
        w[:, 0] = 1e-4  # tiny weights on input 0 ...
    norms = {n: torch.ones(dict(model.named_modules())[n].weight.shape[1]) for n in prunable_linears(model)}
    norms[name][0] = 1e6  # ... which carries huge activations
    original = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {}
    for method in ("magnitude", "wanda"):
        model.load_state_dict(original)
        masks[method] = prune_unstructured(model, model.cfg, PruneSpec(method=method, sparsity=0.5), norms)
    assert not masks["magnitude"][name][:, 0].any()  # magnitude drops every weight of column 0
    assert masks["wanda"][name][:, 0].all()  # wanda keeps them all
    assert not torch.equal(masks["magnitude"][name], masks["wanda"][name])


def test_column_norms_are_the_norms_of_each_layers_real_inputs(llama, corpus_file):
    from llmkit.compress.calibration import calibration_ids

    lm = load_model(llama, device="cpu")
    ids = calibration_ids(lm.tokenizer, corpus_file, 4, 16)  # (4, 16)
    norms = column_norms(lm.model, ids, ["blocks.0.attn.qkv"])
    with torch.no_grad():
        x = lm.model.blocks[0].norm1(lm.model.embed(ids))  # (4, 16, C): what the first qkv reads
    torch.testing.assert_close(norms["blocks.0.attn.qkv"], x.reshape(-1, x.shape[-1]).norm(dim=0))


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_2_4_pattern_holds_in_every_group_of_four(method, llama, corpus_file, tmp_path):
    prune(llama, tmp_path / "out", corpus_file, method=method, sparsity=0.5, pattern="2:4")
    for name, w in linear_weights(tmp_path / "out").items():
        per_group = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)  # (out, in/4)
        assert (per_group == 2).all(), name


def kill_units(src: Path, dst: Path, neurons: int, heads: list[int]) -> Path:
    """A copy of `src` where, in every layer, the first `neurons` MLP neurons and the query heads `heads` write
    nothing to the residual stream (zero output columns): removing them must not change the logits."""
    shutil.copytree(src, dst)
    cfg = read_run_folder_config(src).model
    w = load_weights(src / "model.safetensors")
    hs = cfg.head_dim
    for i in range(cfg.n_layer):
        w[f"blocks.{i}.mlp.proj.weight"][:, :neurons] = 0
        for h in heads:
            w[f"blocks.{i}.attn.proj.weight"][:, h * hs:(h + 1) * hs] = 0
    save_weights(w, dst / "model.safetensors")
    return dst


def logits(run: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(run, device="cpu").model(ids).logits


# 4 query heads in 2 KV groups (0, 1 | 2, 3): `heads` takes one from each group, `kv_groups` a whole group.
@pytest.mark.parametrize("parts, dead_heads, expect", [("mlp,heads", [1, 2], (2, 2, 128)),
                                                       ("mlp,kv_groups", [0, 1], (2, 1, 128))])
def test_structured_pruning_shrinks_and_removing_dead_units_keeps_the_logits(parts, dead_heads, expect, llama,
                                                                              corpus_file, tmp_path):
    dead = kill_units(llama, tmp_path / "dead", neurons=128, heads=dead_heads)
    report = prune(dead, tmp_path / "out", corpus_file, method="structured", sparsity=0.5,
                   parts=tuple(parts.split(",")))
    cfg = read_run_folder_config(tmp_path / "out").model
    assert (cfg.n_head, cfg.n_kv_head, cfg.intermediate_size, cfg.head_dim) == (*expect, 8)
    assert report["params_after"] < report["params_before"]
    lm = load_model(tmp_path / "out", device="cpu")
    blk = lm.model.blocks[0]
    assert blk.mlp.fc.weight.shape == (2 * 128, 32) and blk.mlp.proj.weight.shape == (32, 128)
    assert blk.attn.qkv.weight.shape == ((expect[0] + 2 * expect[1]) * 8, 32)
    assert blk.attn.proj.weight.shape == (32, expect[0] * 8)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    torch.testing.assert_close(logits(tmp_path / "out", ids), logits(dead, ids), atol=1e-5, rtol=1e-5)
    assert (tmp_path / "out" / "model.safetensors").stat().st_size < (dead / "model.safetensors").stat().st_size


def test_pruned_heads_export_to_transformers_with_equal_logits(llama, corpus_file, tmp_path):
    prune(llama, tmp_path / "out", corpus_file, method="structured", sparsity=0.5, parts=("mlp", "heads"))
    assert main(["convert", "--in", str(tmp_path / "out"), "--out", str(tmp_path / "hf"), "--to", "hf"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_attention_heads"], config["head_dim"], config["hidden_size"]) == (2, 8, 32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, config["vocab_size"], (2, 20))
    with torch.no_grad():
        theirs = hf(ids).logits
    ours = logits(tmp_path / "out", ids)[..., :config["vocab_size"]]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # ... and back: the HF folder imports with the same narrow heads
    assert main(["convert", "--in", str(tmp_path / "hf"), "--out", str(tmp_path / "back"), "--to", "llmkit"]) == 0
    assert read_run_folder_config(tmp_path / "back").model.head_dim == 8
    torch.testing.assert_close(logits(tmp_path / "back", ids)[..., :config["vocab_size"]], theirs, atol=1e-4,
                               rtol=1e-4)


@pytest.fixture(scope="module")
def shakespeare_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny Llama with the data_dir fixture's tokenizer, so the prepared shards can train it."""
    return make_run_folder(tmp_path_factory.mktemp("llama-shk"), "llama", Tokenizer.load(tokenizer_dir))


@pytest.mark.slow
@pytest.mark.parametrize("method, lora", [("wanda", False), ("structured", True)])
def test_recovery_trains_in_the_loop_and_keeps_what_pruning_removed(method, lora, shakespeare_llama, data_dir,
                                                                    corpus_file, tmp_path):
    report = prune(shakespeare_llama, tmp_path / "out", corpus_file, method=method, sparsity=0.5, recover_steps=8,
                   data=str(data_dir), recover_lora=lora, recover_lr=1e-2 if lora else 3e-3)
    rec = report["recovery"]
    assert rec["steps"] == 8 and rec["lora"] is lora
    assert rec["val_loss_after"] < rec["val_loss_before"] - 0.02  # a random model learns fast
    names = load_weights(tmp_path / "out" / "model.safetensors")
    assert not any(k.startswith("base_model") or "lora" in k for k in names)  # merged: loading needs no peft
    if method == "structured":
        assert read_run_folder_config(tmp_path / "out").model.intermediate_size == 128
        return
    for name, w in linear_weights(tmp_path / "out").items():
        assert abs(float((w == 0).float().mean()) - 0.5) < 0.01, name  # the zeros survived the training


@pytest.mark.parametrize("argv, message", [
    (["--method", "magnitude", "--sparsity", "1"], "--sparsity 1.0: must be in [0, 1)"),
    (["--method", "wanda", "--sparsity", "-0.1"], "--sparsity -0.1: must be in [0, 1)"),
    (["--method", "magnitude", "--sparsity", "nan"], "must be in [0, 1)"),
    (["--method", "magnitude", "--sparsity", "0.6", "--pattern", "2:4"], "--sparsity must be 0.5"),
    (["--method", "structured", "--sparsity", "0.999"], "removes all 256 MLP neurons"),
    (["--method", "structured", "--sparsity", "0.8", "--parts", "heads"], "removes all 2 query heads"),
    (["--method", "structured", "--sparsity", "0.8", "--parts", "kv_groups"], "removes all 2 KV heads"),
    (["--method", "prune-it", "--sparsity", "0.5"], "unknown (valid: magnitude, wanda, structured)"),
    (["--method", "magnitude", "--sparsity", "0.5", "--recover-steps", "5"], "--recover-steps needs --data"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib", "EMPTY"], "the file is empty"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, llama, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv = [a if a != "EMPTY" else str(empty) for a in argv]
    out = tmp_path / "out"
    assert main(["prune", "--model", str(llama), "--out", str(out), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not out.exists()


def test_cli_prints_the_real_zero_fraction_and_says_storage_stays_dense(llama, corpus_file, tmp_path, capsys):
    assert main(["prune", "--model", str(llama), "--method", "magnitude", "--sparsity", "0.3", "--out",
                 str(tmp_path / "out"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert abs(row["zero_fraction_layers"] - 0.3) < 0.01 and row["bytes"] > 0
    assert main(["prune", "--model", str(llama), "--method", "magnitude", "--sparsity", "0.3", "--out",
                 str(tmp_path / "out2"), "--quiet"]) == 0
    assert "storage stays dense" in capsys.readouterr().out


def test_compensation_refits_the_kept_columns_to_the_dense_output():
    """Kept inputs that correlate with removed ones take over their part: the refit reproduces the dense output
    far better than dropping the columns, equals least squares when undamped, and leaves weights alone when the
    removed inputs wrote nothing."""
    from llmkit.compress.structured import compensate

    g = torch.Generator().manual_seed(0)
    base = torch.randn(512, 6, generator=g, dtype=torch.float64)
    x = base @ torch.randn(6, 12, generator=g, dtype=torch.float64) + 0.05 * torch.randn(512, 12, generator=g,
                                                                                         dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)  # (out, in)
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 10, 11])
    dense = x @ w.T  # (rows, out)
    dropped = ((x[:, keep] @ w[:, keep].T - dense) ** 2).mean()
    refit = compensate(w, x.T @ x, keep, damp=0.0)
    assert ((x[:, keep] @ refit.T - dense) ** 2).mean() < 0.01 * dropped
    torch.testing.assert_close(refit, torch.linalg.lstsq(x[:, keep], dense).solution.T)
    w_dead = w.clone()
    w_dead[:, [1, 4, 6, 9]] = 0
    torch.testing.assert_close(compensate(w_dead, x.T @ x, keep), w_dead[:, keep])
