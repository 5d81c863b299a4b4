import math

import numpy as np
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from llmkit.data.tokenizer import Tokenizer
from llmkit.infer.api import LLM
from llmkit.infer.evaluate import evaluate_lm
from llmkit.model import build_model


def test_eval_equals_plain_cross_entropy_over_every_token(tmp_path, tokenizer_dir):
    """Fused, chunked, batched evaluation == one plain cross-entropy over all windows; bits/byte follows."""
    tok = Tokenizer.load(tokenizer_dir)
    model = build_model(tiny_model_config("llama", vocab_size=tok.vocab_size, block_size=32)).eval()
    text = "O Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name.\n" * 6
    (tmp_path / "t.txt").write_text(text)
    res = evaluate_lm(LLM(model=model, tokenizer=tok, path=tmp_path), tmp_path / "t.txt", batch_size=3, quiet=True)
    ids = torch.tensor(tok.encode(text))
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 32):
            w = ids[s:s + 33]
            logits = model(w[None, :-1]).logits[0, :, : tok.vocab_size]
            nll += float(F.cross_entropy(logits, w[1:], reduction="sum"))
            n += len(w) - 1
    assert res["predicted_tokens"] == n == len(ids) - 1
    assert abs(res["loss"] - nll / n) < 1e-5
    assert abs(res["bits_per_byte"] - nll / n / math.log(2) * len(ids) / len(text.encode())) < 1e-5


def test_eval_reads_bos_first_when_the_tokenizer_asks(tmp_path, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    model = build_model(tiny_model_config("llama", vocab_size=tok.vocab_size, block_size=32)).eval()
    text = "O Romeo, Romeo! wherefore art thou Romeo?\n" * 3
    (tmp_path / "t.txt").write_text(text)
    firsts: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args: firsts.append(int(args[0][0, 0])))
    bos_tok = Tokenizer(tok.tk, bos_token="<|pad|>", add_bos=True)
    try:
        with_bos = evaluate_lm(LLM(model=model, tokenizer=bos_tok, path=tmp_path), tmp_path / "t.txt", quiet=True)
        assert firsts[0] == bos_tok.bos_id
        firsts.clear()
        plain = evaluate_lm(LLM(model=model, tokenizer=tok, path=tmp_path), tmp_path / "t.txt", quiet=True)
        assert firsts[0] == tok.encode(text)[0] != bos_tok.bos_id
    finally:
        hook.remove()
    n = len(tok.encode(text))
    assert with_bos["tokens"] == plain["tokens"] == n  # the text's own tokens either way
    assert with_bos["predicted_tokens"] == n and plain["predicted_tokens"] == n - 1  # BOS predicts the first one


def test_training_evaluation_and_llmkit_eval_agree_with_a_padded_vocabulary(data_dir, tokenizer_dir):
    """train.loop.evaluate (causal_lm) and infer.evaluate on the same windows give the same loss and bits per
    byte, though the head has padding rows with large non-zero weights (they must not enter the softmax)."""
    from llmkit.data.shards import load_meta, load_tokens
    from llmkit.model.loss import lm_figures
    from llmkit.train.loop import evaluate
    from llmkit.train.objectives import CausalLM

    tok = Tokenizer.load(tokenizer_dir)
    T = 32
    model = build_model(tiny_model_config("llama", vocab_size=tok.vocab_size, block_size=T, pad_vocab_multiple=96,
                                          tie_embeddings=False)).eval()
    V = tok.vocab_size
    assert model.cfg.padded_vocab_size > V
    with torch.no_grad():
        model.lm_head.weight[V:] = torch.randn_like(model.lm_head.weight[V:])  # padding rows: big, not zero
    res = evaluate_lm(LLM(model=model, tokenizer=tok, path=data_dir), data_dir, split="val", batch_size=16, quiet=True)
    # The same windows as one training-style batch: inputs and shifted labels, the short last window padded -100.
    tokens = torch.from_numpy(np.asarray(load_tokens(data_dir, "val"), dtype=np.int64))
    starts = range(0, len(tokens) - 1, T)
    x = torch.zeros(len(starts), T, dtype=torch.long)
    y = torch.full((len(starts), T), -100, dtype=torch.long)
    for j, s in enumerate(starts):
        w = tokens[s:s + T + 1]
        x[j, : len(w) - 1], y[j, : len(w) - 1] = w[:-1], w[1:]
    train_res = evaluate(model, CausalLM(), [{"input_ids": x, "labels": y}], torch.device("cpu"), torch.float32)
    split = load_meta(data_dir)["splits"]["val"]
    train_bpb = lm_figures(train_res["loss"], split["tokens"], split["bytes"])["bits_per_byte"]  # as pretrain logs it
    assert abs(train_res["loss"] - res["loss"]) <= 1e-5 * res["loss"]
    assert abs(train_bpb - res["bits_per_byte"]) <= 1e-5 * res["bits_per_byte"]
    # and both are the loss over the real vocabulary only
    with torch.no_grad():
        logits = model(x).logits[..., :V]
    assert abs(F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)).item() - res["loss"]) <= 1e-5 * res["loss"]
