"""Where a quantised model's error comes from: one part of the model at a time (issue 8).

Rounds the weights of one part of a float model onto llmkit's int8 / int4 grids (compress/rtn.py, the grids
`llmkit quantize --method rtn` stores) and scores the result against the untouched model on held-out text:
ΔPPL, mean KL divergence to the float model, same-top-token %. The rounded weights stay float32
("fake quantisation"), so only the grid's error is measured, not the kernels. Parts: the Transformer blocks'
matrices (`body`), the embedding with its tied head (`emb`), or both (`all`). One JSON line per variant.

Three more variants bound what int8 can reach on a machine, apart from the grid llmkit stores:
- `int8 gG all`: int8 with one symmetric scale per G input weights instead of per row (llama.cpp's Q8_0 is G = 32).
  Not a format llmkit writes (its CPU kernel, `_weight_int8pack_mm`, takes one scale per row): the accuracy a finer
  int8 grid would buy.
- `bf16-io`: weights exact, but every Linear's input and output rounded to bfloat16, which is what the packed CPU
  kernels do (model/quant.py: with float32 activations they run a scalar path ~10x slower). The kernels' own floor.
- `int8 kernel`: the real thing, `llmkit quantize --to int8` (compress/quantize.py) run through QuantLinear.

    python bench/quant_split.py [--model smollm2-135m-instruct] [--data README.md] [--tokens 2048]
        [--variants "int8 body,int8 emb,int8 all,int8 g32 all,bf16-io,int8 kernel,int4 g32 body,int4 g64 body"]

On SmolLM2, whose packaged weights are a Q4_1 GGUF (blocks of 32) with a Q8_0 embedding, this separates the
per-row int8 grid's loss on the blocks from its loss on the embedding, shows that int4 in groups of 32 keeps the
source grid while groups of 64 do not, and measures the two floors under `llmkit quantize --to int8`'s figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from llmkit.compress.quantize import QuantSpec, quantize_model
from llmkit.compress.rtn import int8_codes, int8_scales, rtn
from llmkit.infer.api import LLM
from llmkit.infer.evaluate import token_stream
from llmkit.infer.load import load_model
from llmkit.model.quant import dequantize, pack_int4


def rounded(w: Tensor, bits: int, group: int) -> Tensor:
    """w (N, K) after rounding onto the grid `llmkit quantize --method rtn` stores, read back as QuantLinear
    reads it (model/quant.dequantize)."""
    q, s, z = rtn(w, bits, group)
    return dequantize(q.to(torch.int8) if bits == 8 else pack_int4(q), s, z)


def rounded_int8_groups(w: Tensor, group: int) -> Tensor:
    """w (N, K) on a symmetric int8 grid with one (bfloat16) scale per `group` input weights (Q8_0's layout)."""
    N, K = w.shape
    g = w.reshape(N * K // group, group)  # (N*G, g): each group a row of llmkit's per-row int8 grid
    s = int8_scales(g)
    return (int8_codes(g, s) * s[:, None]).reshape(N, K)


class Bf16IO(nn.Module):
    """A Linear whose input and output are rounded to bfloat16, as the packed CPU kernels see and give them."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x.to(torch.bfloat16).float()).to(torch.bfloat16).float()


WHOLE_MODEL = ("bf16-io", "int8 kernel")  # variants that change the model's arithmetic, not one part's weights


def steps(variant: str) -> list[str]:
    """`int8 g32 all+bf16-io` -> ["int8 g32 all", "bf16-io"]: applied in that order (weights rounded, then the I/O).
    Every grid step is parsed here, so a typo stops the bench before the model loads."""
    out = [step.strip() for step in variant.split("+")]
    for step in out:
        if step not in WHOLE_MODEL:
            parse(step)
    return out


def parse(variant: str) -> tuple[int, int, str]:
    """`int8 body`, `int8 g32 all`, `int4 g32 emb` -> (bits, group (0: per row), part: body | emb | all)."""
    words = variant.split()
    if not 2 <= len(words) <= 3 or words[0] not in ("int8", "int4"):
        raise SystemExit(f"error: variant {variant!r}: expected `int8|int4 [gGROUP] body|emb|all`")
    bits = {"int8": 8, "int4": 4}[words[0]]
    group = int(words[1][1:]) if len(words) == 3 else 0
    if bits == 4 and not group:
        raise SystemExit(f"error: variant {variant!r}: int4 needs a group, e.g. `int4 g32 body`")
    if words[-1] not in ("body", "emb", "all"):
        raise SystemExit(f"error: variant {variant!r}: the part is body, emb or all")
    return bits, group, words[-1]


def apply(model: nn.Module, variant: str) -> None:
    """Change `model` in place into `variant` (see the module docstring)."""
    if variant == "int8 kernel":
        quantize_model(model, QuantSpec("int8"))
        return
    if variant == "bf16-io":
        for owner in list(model.modules()):
            for name, child in list(owner.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(owner, name, Bf16IO(child))
        return
    bits, group, part = parse(variant)
    for name, p in model.named_parameters():
        in_blocks = name.startswith("blocks.")
        if p.dim() == 2 and (part == "all" or in_blocks == (part == "body")):
            w = p.detach().float()
            p.copy_(rounded_int8_groups(w, group) if bits == 8 and group else rounded(w, bits, group))


@torch.no_grad()  # not inference_mode: QuantLinear's kernel cache reads the weight's version counter
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a float model: built-in name or run folder")
    ap.add_argument("--data", type=Path, default=Path("README.md"), help="held-out text")
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens scored")
    ap.add_argument("--context", type=int, default=512, help="scoring window")
    ap.add_argument("--variants", default="int8 body,int8 emb,int8 all,int8 g32 all,bf16-io,int8 kernel,"
                    "int4 g32 body,int4 g64 body", help="comma-separated: `int8 [gGROUP] body|emb|all`, "
                    "`int4 gGROUP body|emb|all`, `bf16-io`, `int8 kernel`; `A+B` applies both")
    args = ap.parse_args()
    variants = {v.strip(): steps(v) for v in args.variants.split(",")}  # a typo stops here, before the model loads
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
    pristine = copy.deepcopy(model)
    print(json.dumps({"model": args.model, "data": str(args.data), "tokens": len(targets),
                      "perplexity": math.exp(base_nll)}), flush=True)
    for variant, parts in variants.items():
        model = copy.deepcopy(pristine)
        for step in parts:
            apply(model, step)
        lp = log_probs()
        nll = -float(lp.gather(1, targets[:, None]).mean())
        print(json.dumps({"variant": variant, "delta_ppl_pct": 100 * (math.exp(nll - base_nll) - 1),
                          "kl_divergence": float((ref.exp() * (ref - lp)).sum(-1).clamp(min=0).mean()),
                          "same_top_token": 100 * float((lp.argmax(-1) == ref.argmax(-1)).float().mean())}),
              flush=True)


if __name__ == "__main__":
    main()
