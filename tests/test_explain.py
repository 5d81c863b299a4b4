"""`llmkit explain`'s numbers: attention equals transformers' eager attention, the logit lens ends at the model's own
logits, integrated gradients are complete, rollout matches a hand computation, bad input is one ConfigError."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from helpers_convert import chat_tokenizer, make_classifier_run, make_run_folder
from llmkit.errors import ConfigError
from llmkit.explain import explain
from llmkit.explain.attention import head_summaries, rollout
from llmkit.explain.capture import capture, load_subject, tokenize
from llmkit.explain.lens import lens_logits

TEXT = "First Citizen: before we proceed any further, hear me speak."
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def _random_hf(model: torch.nn.Module, out: Path, tok) -> tuple[torch.nn.Module, Path]:
    """Every tensor random and large enough that attention is far from uniform (a dropped term shows), saved with
    the tokenizer; the model in eager attention so transformers returns its softmax weights."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() == 1 else 0.15)
    model.eval().save_pretrained(out)
    tok.save(out)
    return model, out


@pytest.fixture(scope="module")
def toks(corpus_file):
    from llmkit.data.wordpiece import train_wordpiece

    text = corpus_file.read_text()[:50_000]
    return {"bpe": chat_tokenizer(text), "wordpiece": train_wordpiece([text], vocab_size=300)}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, toks) -> dict[str, tuple[torch.nn.Module, Path]]:
    """GPT-2, Llama and BERT (with its MLM head) flavours in transformers, random weights, as HF folders."""
    root = tmp_path_factory.mktemp("hf")
    bpe, wp = toks["bpe"], toks["wordpiece"]
    eager = dict(attn_implementation="eager")
    gpt2 = transformers.GPT2Config(vocab_size=bpe.vocab_size, n_positions=128, n_embd=64, n_layer=2, n_head=4, **eager)
    llama = transformers.LlamaConfig(vocab_size=bpe.vocab_size, max_position_embeddings=128, num_key_value_heads=2,
                                     tie_word_embeddings=False, **SMALL, **eager)
    bert = transformers.BertConfig(vocab_size=wp.vocab_size, max_position_embeddings=128, **SMALL, **eager)
    return {"gpt2": _random_hf(transformers.GPT2LMHeadModel(gpt2), root / "gpt2", bpe),
            "llama": _random_hf(transformers.LlamaForCausalLM(llama), root / "llama", bpe),
            "bert": _random_hf(transformers.BertForMaskedLM(bert), root / "bert", wp)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toks) -> dict[str, Path]:
    """Fine-tuned-classifier run folders (decoder and encoder backbones) and a bare encoder (no MLM head saved)."""
    root = tmp_path_factory.mktemp("runs")
    bare = make_run_folder(root / "bare", "bert", toks["wordpiece"])
    from safetensors.torch import load_file, save_file

    w = load_file(bare / "model.safetensors")
    save_file({k: v for k, v in w.items() if not k.startswith(("mlm.", "nsp."))}, bare / "model.safetensors")
    return {"clf-llama": make_classifier_run(root / "clf-llama", "llama", toks["bpe"]),
            "clf-bert": make_classifier_run(root / "clf-bert", "bert", toks["wordpiece"]),
            "bare": bare, "gpt2": make_run_folder(root / "gpt2", "gpt2", toks["bpe"], block_size=32)}


# ------------------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_attention_equals_transformers_eager_and_rows_sum_to_one(hf_models, arch):
    hf, src = hf_models[arch]
    r = explain(src, TEXT, methods=["attention"])
    got = np.array(r["attention"]["layers"])  # (L, H, T, T) as the report gives it (rounded to 6 digits)
    with torch.no_grad():
        want = torch.stack(hf(torch.tensor([r["token_ids"]]), output_attentions=True).attentions)[:, 0].numpy()
    assert got.shape == want.shape == (2, 4, len(r["tokens"]), len(r["tokens"]))
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(want - 0.25).max() > 0.2  # far from uniform: the comparison has something to compare
    assert np.allclose(got.sum(-1), 1.0, atol=1e-5)
    assert len(r["attention"]["heads"]) == 8 and not r["attention"]["truncated"]
    json.dumps({k: v for k, v in r.items() if k != "_arrays"})  # JSON-ready


def test_tokens_are_shown_decoded(hf_models):
    r = explain(hf_models["gpt2"][1], "the king", methods=["attention"])
    assert "".join(r["tokens"]) == "the king" and not any("Ġ" in t for t in r["tokens"])
    r = explain(hf_models["bert"][1], "the king", methods=["attention"])
    assert r["tokens"][0] == "[CLS]" and r["tokens"][-1] == "[SEP]"


def test_head_summaries_by_hand():
    a = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])  # one head, 2 tokens
    (s,) = head_summaries([a])
    assert s["entropy"] == pytest.approx(math.log(2) / 2)  # rows: 0 nats, ln 2 nats
    assert s["mean_distance"] == pytest.approx(0.25)  # rows: 0, 0.5 tokens back
    assert s["first_token"] == pytest.approx(0.75)


def test_rollout_by_hand():
    """Two heads, two tokens: mean = [[1, 0], [.4, .6]]; with the residual, A_hat = [[1, 0], [.2, .8]]."""
    a = torch.tensor([[[1.0, 0.0], [0.2, 0.8]], [[1.0, 0.0], [0.6, 0.4]]])  # (nh, T, T)
    assert torch.allclose(rollout([a]), torch.tensor([[1.0, 0.0], [0.2, 0.8]], dtype=torch.float64))
    # two layers compose by product: row 1 = .2 * [1, 0] + .8 * [.2, .8] = [.36, .64]
    assert torch.allclose(rollout([a, a]), torch.tensor([[1.0, 0.0], [0.36, 0.64]], dtype=torch.float64))


def test_rollout_of_a_one_layer_model(runs, tmp_path, toks):
    src = make_run_folder(tmp_path / "one", "gpt2", toks["bpe"], n_layer=1)
    r = explain(src, TEXT, methods=["attention", "rollout"])
    a = np.array(r["attention"]["layers"][0])  # (H, T, T)
    hand = 0.5 * a.mean(0) + 0.5 * np.eye(a.shape[-1])  # rows already sum to 1: nothing to renormalise
    assert np.abs(np.array(r["rollout"]) - hand).max() <= 1e-5


def test_long_inputs_leave_the_maps_out_of_the_json_but_not_the_arrays(hf_models):
    r = explain(hf_models["llama"][1], TEXT, methods=["attention", "rollout"], max_attention_tokens=4)
    assert r["attention"]["truncated"] and r["attention"]["layers"] is None and r["rollout"] is None
    assert len(r["attention"]["heads"]) == 8 and r["_arrays"]["rollout"].shape == (len(r["tokens"]),) * 2


# ------------------------------------------------------------------------------------------------ logit lens


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_logit_lens_last_layer_is_the_models_own_logits(hf_models, arch):
    hf, src = hf_models[arch]
    s = load_subject(src)
    ids = tokenize(s, TEXT)
    cap = capture(s, ids)
    x = torch.tensor([ids])
    kw = dict(need_weights=True, need_hidden=True) | (dict(all_logits=True) if arch == "bert" else {})
    with torch.no_grad():
        own = s.backbone(x, **kw)  # the model's own forward, the same (eager) attention path the capture takes
        lens = lens_logits(s, own.hidden_states[-1][0])
        theirs = hf(x).logits[0]
    assert torch.equal(lens, own.logits[0])
    assert torch.equal(cap.hidden_states[-1], own.hidden_states[-1][0])
    V = hf.config.vocab_size
    assert (lens[:, :V] - theirs).abs().max() <= 1e-4
    r = explain(src, TEXT, methods=["logit-lens"], top_k=3)
    table = r["logit_lens"]
    assert len(table) == 3 and all(len(row) == len(ids) for row in table)
    probs = torch.softmax(theirs, -1)  # (T, V)
    last = table[-1]
    assert [c["id"] for c in last] == probs.argmax(-1).tolist()
    assert [c["prob"] for c in last] == pytest.approx(probs.max(-1).values.tolist(), rel=1e-5)
    assert all(len(c["top"]) == 3 and c["top"][0] == [c["token"], c["prob"]] for c in last)
    # the rank of what each position should predict, recomputed from transformers' logits
    want = ids[1:] + [r["target"]["id"]] if arch != "bert" else ids
    ranks = [int((theirs[p] > theirs[p, w]).sum()) for p, w in enumerate(want)]
    assert [c["target_rank"] for c in last] == ranks
    if arch != "bert":
        assert last[-1]["target_rank"] == 0 and r["lens_layer_of_target"] <= 2


@pytest.mark.parametrize("which", ["clf-llama", "clf-bert"])
def test_classifier_lens_ends_at_its_class_probabilities(runs, which):
    from llmkit.tasks.classify import load_classifier

    clf = load_classifier(runs[which])
    r = explain(runs[which], TEXT, methods=["logit-lens"])
    want = clf.predict([TEXT])[0]
    assert r["kind"] == "classifier" and r["target"]["label"] == want["label"]
    assert r["target"]["probability"] == pytest.approx(want["probability"], rel=1e-5)
    last = r["logit_lens"][-1]
    assert len(last) == 1 and dict(last[0]["top"]) == pytest.approx(want["probabilities"], rel=1e-5)
    assert len(r["logit_lens"]) == r["n_layer"] + 1


# ------------------------------------------------------------------------------------------------ attributions


@pytest.mark.parametrize("which", ["llama", "gpt2", "clf-bert"])
def test_integrated_gradients_are_complete_at_32_steps(hf_models, runs, which):
    src = hf_models[which][1] if which in hf_models else runs[which]
    r = explain(src, TEXT, methods=["saliency", "integrated-gradients"], ig_steps=32)
    a = r["attributions"]
    gap = a["f_x"] - a["f_baseline"]
    assert abs(gap) > 0.05  # the baseline changes the prediction: completeness is not 0 == 0
    assert abs(sum(a["integrated_gradients"]) - gap) <= 0.01 * abs(gap)
    assert abs(a["ig_delta"]) <= 0.01 * abs(gap) and a["ig_steps"] == 32
    assert len(a["saliency"]) == len(a["integrated_gradients"]) == len(r["tokens"])
    assert a["integrated_gradients"][0] == 0  # position 0 is kept in the baseline (see baseline_ids)


def test_attributions_explain_the_chosen_target(hf_models):
    src = hf_models["gpt2"][1]
    top = explain(src, TEXT, methods=["saliency"])
    other = explain(src, TEXT, methods=["saliency"], target=" the")
    assert other["target"]["token"] == " the" and other["target"]["id"] != top["target"]["id"]
    assert other["attributions"]["saliency"] != top["attributions"]["saliency"]
    assert other["attributions"]["f_x"] == pytest.approx(math.log(other["target"]["probability"]), rel=1e-4)


# ------------------------------------------------------------------------------------------------ bad input


def test_a_bare_encoder_does_what_it_can_and_says_what_it_cannot(runs):
    r = explain(runs["bare"], TEXT)
    assert r["methods"] == ["attention", "rollout"] and r["target"] is None and r["logit_lens"] is None
    with pytest.raises(ConfigError, match="bare bert encoder.*'logit-lens'.*masked-LM head.*supports attention, "
                                          "rollout"):
        explain(runs["bare"], TEXT, methods=["logit-lens"])
    with pytest.raises(ConfigError, match="cannot do 'saliency'"):
        explain(runs["bare"], TEXT, methods="attention,saliency")


@pytest.mark.parametrize(("kw", "message"), [
    (dict(layer=2), r"--layer 2 is out of range: .* has layers 0\.\.1$"),
    (dict(layer=-1), r"--layer -1 is out of range"),
    (dict(head=4), r"--head 4 is out of range: .* has heads 0\.\.3 in each layer$"),
    (dict(target=" Citizenship"), r"--target ' Citizenship' is \d+ tokens for this tokenizer \(' .*'\); give exactly "
                                  r"one token, e\.g\. ' "),
    (dict(target=""), r"--target '' is 0 tokens"),
    (dict(label="pos"), r"--label needs a fine-tuned classifier; .* is a decoder; use --target"),
    (dict(methods=["attention", "lens"]), r"unknown method 'lens'; valid: attention, rollout, logit-lens, "),
    (dict(methods=[]), r"--methods is empty"),
    (dict(text="  "), r"--text is empty"),
    (dict(text="word " * 40), r"--text is \d+ tokens; .* reads at most 32 \(its block_size\)"),
])
def test_bad_input_is_one_config_error(runs, kw, message):
    args = {"text": "hear me speak.", "methods": ["attention"], **kw}
    with pytest.raises(ConfigError, match=message) as e:
        explain(runs["gpt2"], **args)
    assert "\n" not in str(e.value)


def test_classifier_labels_are_checked(runs):
    with pytest.raises(ConfigError, match="--label 'maybe' is not a class of .*; its labels: neg, pos"):
        explain(runs["clf-llama"], TEXT, methods=["attention"], label="maybe")
    with pytest.raises(ConfigError, match="--target needs a decoder .* is a classifier; use --label"):
        explain(runs["clf-llama"], TEXT, methods=["attention"], target="x")
    assert explain(runs["clf-llama"], TEXT, methods=["attention"], label="neg")["target"]["label"] == "neg"
