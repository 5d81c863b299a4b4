"""`llmkit quantize`: a float model -> a run folder of int8 / int4 weights that every verb loads (model/quant.py).

What is quantised: every Linear inside the Transformer blocks (to --to), and the token embedding with the output
head to int8 per row whatever --to says. SmolLM2-135M's tied 49,152 x 576 embedding is 28 M of its 135 M
parameters: left in float32 it alone would be 21 % of the fp32 file, so an int4 file could not reach 30 %; int8
per row keeps its one copy (the tied head reads the same rows and scales) at a quarter of the size and the head's
matmul on the int8 kernel. The head is not taken to int4: it is the layer whose error reaches every logit
directly. Norms, biases and GPT-2's position table stay float (they are tiny).

Methods: `rtn` rounds each weight to the nearest grid point; `gptq` (compress/gptq.py) quantises column by column
and moves each column's rounding error onto the columns not yet quantised, weighted by the inverse Hessian of the
layer's calibration inputs, which is what makes int4 usable on ~100 M-parameter models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmkit.compress.rtn import make_layer, rtn, set_module
from llmkit.errors import ConfigError
from llmkit.model.quant import QuantEmbedding, QuantLinear

BITS = {"int8": 8, "int4": 4}
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "gptq")


@dataclass
class QuantSpec:
    to: str = "int8"  # int8 | int4
    group_size: int = 64  # int4 only
    method: str = "rtn"  # rtn | gptq
    calib: str | None = None  # calibration text for gptq (None: the built-in default)
    calib_seqs: int = 128
    seq_len: int = 512
    damp: float = 0.01  # GPTQ: fraction of the Hessian's mean diagonal added to it
    act_order: bool = False  # GPTQ: columns in order of decreasing Hessian diagonal

    @property
    def bits(self) -> int:
        return BITS[self.to]

    def check(self) -> None:
        if self.to not in BITS:
            raise ConfigError(f"--to {self.to!r}: valid targets are {', '.join(BITS)}")
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r}: valid methods are {', '.join(METHODS)}")
        if self.to == "int4" and self.group_size not in GROUP_SIZES:
            raise ConfigError(f"--group-size {self.group_size}: int4 kernels take {', '.join(map(str, GROUP_SIZES))}")


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers --to applies to: everything inside the Transformer blocks."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")}


def check_model(model: nn.Module, spec: QuantSpec, src: str) -> None:
    """Refuse what cannot be quantised, before any work: an already-quantised model, a group size that does not
    divide a layer's input width, a model with nothing to quantise."""
    if any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules()):
        raise ConfigError(f"{src} is already quantised (written by `llmkit quantize`); quantise the float model "
                          "it came from instead")
    layers = block_linears(model)
    if not layers:
        raise ConfigError(f"{src}: no Transformer-block Linear layers to quantise")
    if spec.to == "int4":
        for name, lin in layers.items():
            if lin.in_features % spec.group_size:
                raise ConfigError(f"--group-size {spec.group_size} does not divide the input width "
                                  f"{lin.in_features} of layer {name}; choose one of "
                                  f"{', '.join(str(g) for g in GROUP_SIZES if lin.in_features % g == 0) or 'none'}")


def quantize_embeddings(model: nn.Module) -> None:
    """Embedding and output head to int8 per row; a tied pair shares one copy (model/quant.py tie_quantized)."""
    from llmkit.model.quant import tie_quantized

    emb: nn.Embedding = model.embed
    head: nn.Linear = model.lm_head
    tied = head.weight is emb.weight
    q, s, _ = rtn(emb.weight.detach(), 8, 0)
    qe = QuantEmbedding(emb.num_embeddings, emb.embedding_dim)
    qe.qweight, qe.scales = q.to(torch.int8), s.float()
    model.embed = qe
    if tied:
        model.lm_head = QuantLinear(head.in_features, head.out_features, 8)
        tie_quantized(model)
    else:
        model.lm_head = make_layer(head, 8, 0, *rtn(head.weight.detach(), 8, 0))


def quantize_rtn(model: nn.Module, spec: QuantSpec) -> None:
    """Round every block Linear to nearest, in place."""
    for name, lin in block_linears(model).items():
        set_module(model, name, make_layer(lin, spec.bits, spec.group_size, *rtn(lin.weight.detach(), spec.bits,
                                                                                   spec.group_size)))


def quantize_model(model: nn.Module, spec: QuantSpec, calib_ids: Tensor | None = None, quiet: bool = True) -> None:
    """Quantise a float decoder in place: block Linears by `spec.method` (GPTQ reads `calib_ids` (N, T)), then the
    embedding and head to int8."""
    if spec.method == "gptq":
        from llmkit.compress.gptq import quantize_gptq

        if calib_ids is None:
            raise ConfigError("--method gptq needs calibration data")
        quantize_gptq(model, spec.bits, spec.group_size, calib_ids, spec.damp, spec.act_order, quiet=quiet)
    else:
        quantize_rtn(model, spec)
    quantize_embeddings(model)


def summary(spec: QuantSpec, n_calib: int) -> dict[str, Any]:
    """What quant.json-like records say: format, method, group, calibration."""
    rec: dict[str, Any] = {k: v for k, v in asdict(spec).items() if k in ("to", "method")}
    if spec.to == "int4":
        rec["group_size"] = spec.group_size
    rec["embeddings"] = "int8 per row (tied head shares it)"
    if spec.method == "gptq":
        rec |= {"calib": spec.calib or "shakespeare", "calib_seqs": n_calib, "seq_len": spec.seq_len,
                "damp": spec.damp, "act_order": spec.act_order}
    return rec


def quantize(src: str, out: str | Path, spec: QuantSpec, quiet: bool = False) -> dict[str, Any]:
    """The `llmkit quantize` verb: load, check, (calibrate), quantise, write a run folder atomically. Every check
    runs before anything is written to `out`."""
    from llmkit.compress.calibration import calibration_ids
    from llmkit.infer.load import load_model
    from llmkit.interop.run_folder import Converted, check_replaceable, write_run_folder
    from llmkit.model.quant import is_quantized
    from llmkit.model.weights import weights_for_save

    spec.check()
    out = Path(out)
    check_replaceable(out)
    got = load_model(src, "cpu", "float32", need="decoder")
    if is_quantized(got.weights):
        raise ConfigError(f"{src} is already quantised (written by `llmkit quantize`); quantise the float model "
                          "it came from instead")
    if got.cfg.arch not in ("gpt2", "llama"):
        raise ConfigError(f"{src}: a {got.cfg.arch} model; `llmkit quantize` takes gpt2 / llama decoders")
    model = got.model
    check_model(model, spec, src)
    ids = None
    if spec.method == "gptq":
        seq_len = min(spec.seq_len, got.cfg.block_size)
        ids = calibration_ids(got.tokenizer, spec.calib, spec.calib_seqs, seq_len)  # (N, T)
    with torch.no_grad():
        quantize_model(model, spec, ids, quiet=quiet)
    # Scales and zeros hold bfloat16 values (round_bf16): stored as such, half the bytes, nothing lost.
    weights = {k: v.to(torch.bfloat16) if k.endswith((".scales", ".zeros")) else v
               for k, v in weights_for_save(model).items()}
    record = summary(spec, 0 if ids is None else len(ids))
    source = {"format": "llmkit", "quantized_from": str(src), "quantization": record}
    write_run_folder(Converted(got.cfg, weights, got.tokenizer, source), out)
    size = (out / "model.safetensors").stat().st_size
    return {"out": str(out), "bytes": size, **record}
