import math

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
