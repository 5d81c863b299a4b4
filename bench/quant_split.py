"""Where a quantised model's error comes from: one part of the model at a time (issue 8).

Rounds the weights of one part of a float model onto llmkit's int8 / int4 grids (compress/rtn.py, the grids
`llmkit quantize --method rtn` stores) and scores the result against the untouched model on held-out text:
ΔPPL, mean KL divergence to the float model, same-top-token %. The rounded weights stay float32
("fake quantisation"), so only the grid's error is measured, not the kernels. Parts: the Transformer blocks'
matrices, or the embedding (with its tied head). One JSON line per variant.

    python bench/quant_split.py [--model smollm2-135m-instruct] [--data README.md] [--tokens 2048]
        [--variants "int8 body,int8 emb,int4 g32 body,int4 g64 body"]

On SmolLM2, whose packaged weights are a Q4_1 GGUF (blocks of 32) with a Q8_0 embedding, this separates the
per-row int8 grid's loss on the blocks from its loss on the embedding, and shows that int4 in groups of 32 keeps
the source grid while groups of 64 do not.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from llmkit.compress.rtn import rtn
from llmkit.infer.api import LLM
from llmkit.infer.evaluate import token_stream
from llmkit.infer.load import load_model
from llmkit.model.quant import dequantize, pack_int4


def rounded(w: Tensor, bits: int, group: int) -> Tensor:
    """w (N, K) after rounding onto the grid `llmkit quantize --method rtn` stores, read back as QuantLinear
    reads it (model/quant.dequantize)."""
    q, s, z = rtn(w, bits, group)
    return dequantize(q.to(torch.int8) if bits == 8 else pack_int4(q), s, z)


def parse(variant: str) -> tuple[int, int, bool]:
    """`int8 body`, `int4 g32 emb` -> (bits, group, blocks?)."""
    words = variant.split()
    bits = {"int8": 8, "int4": 4}[words[0]]
    group = int(words[1][1:]) if bits == 4 else 0
    return bits, group, words[-1] == "body"


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a float model: built-in name or run folder")
    ap.add_argument("--data", type=Path, default=Path("README.md"), help="held-out text")
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens scored")
    ap.add_argument("--context", type=int, default=512, help="scoring window")
    ap.add_argument("--variants", default="int8 body,int8 emb,int4 g32 body,int4 g64 body",
                    help="comma-separated `int8 body|emb` or `int4 gGROUP body|emb`")
    args = ap.parse_args()
    got = load_model(args.model, "cpu", "float32")
    model = got.model.eval()
    ids = token_stream(LLM(model, got.tokenizer, Path(args.model)), args.data)[0][:args.tokens + 1].astype(np.int64)
    V, T = got.cfg.vocab_size, args.context
    targets = torch.from_numpy(ids[1:])  # (n,)

    def log_probs() -> Tensor:  # (n, V)
        out = []
        for s in range(0, len(ids) - 1, T):
            w = torch.from_numpy(ids[s:s + T + 1])
            out.append(torch.log_softmax(model(w[None, :-1]).logits[0, :, :V].float(), -1))
        return torch.cat(out)

    ref = log_probs()
    base_nll = -float(ref.gather(1, targets[:, None]).mean())
    original = {k: v.clone() for k, v in model.state_dict().items()}
    print(json.dumps({"model": args.model, "data": str(args.data), "tokens": len(targets),
                      "perplexity": math.exp(base_nll)}), flush=True)
    for variant in (v.strip() for v in args.variants.split(",")):
        bits, group, body = parse(variant)
        model.load_state_dict(original)
        for name, p in model.named_parameters():
            if p.dim() == 2 and name.startswith("blocks.") == body:
                p.copy_(rounded(p.detach().float(), bits, group))
        lp = log_probs()
        nll = -float(lp.gather(1, targets[:, None]).mean())
        print(json.dumps({"variant": variant, "delta_ppl_pct": 100 * (math.exp(nll - base_nll) - 1),
                          "kl_divergence": float((ref.exp() * (ref - lp)).sum(-1).clamp(min=0).mean()),
                          "same_top_token": 100 * float((lp.argmax(-1) == ref.argmax(-1)).float().mean())}),
              flush=True)


if __name__ == "__main__":
    main()
