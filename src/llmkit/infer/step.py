"""The decode step: one callable that runs a model's forward for prefill, single-token decoding and the k+1-token
verification of speculative decoding, with as little between the kernels as the device allows.

`fast_forward(model)` returns a callable with the model's forward signature (input_ids, attention_mask_2d=None,
cache=None, logits_slice=None, ... -> DecoderOutput). Generation and speculative decoding call the model through
it, so whatever makes the step faster applies to all of them at once.

What it does, each lever kept only where it was measured to pay (bench/speculative.py `--breakdown` prints the
figures; see its docstring):
- **Column-major weights on a CPU in float32.** A batch-1 step is one matrix-vector product per weight matrix.
  oneDNN/MKL's GEMV reads a (out, in) row-major weight ~1.3x slower than the same numbers stored (in, out), i.e.
  `x @ W_t`. The weights are re-laid in place (`weight.data = weight.t().contiguous().t()`): the same parameter,
  the same shape and values, one copy (a transient extra matrix while each is moved), saved contiguous as before
  (model/weights.py). bfloat16 is the opposite (the transposed bf16 GEMV is ~10x slower), so it is left alone.
- **`torch.compile`** only when asked (`compile=True`): `torch.compile(model)`, kept on the model and reused.
  Measured on the shared 2-core CPU, fp32, 1 thread, the draft shape (6 layers, 256 wide, 49,152 vocab): no graph
  break, one recompile (the cache position becomes dynamic), ~22 s of warm-up (prefill + first step), then a step
  of 5.3 ms against 8.3 ms eager, the same greedy tokens. SmolLM2-135M's shape (30 layers): 160 s of warm-up, then
  a step of 59 ms against 47 ms eager, slower. So `auto` does not compile: warm-up of a minute or more per model
  and process never pays back in a one-shot `generate`, and the big model loses outright; a long-lived process
  drafting with a small model may ask for it. On a GPU (launch-bound steps; CUDA graphs) it is not measured here.
- Grouped-query attention in the decode path lets SDPA share kv heads (`enable_gqa`, model/layers.py) instead of
  copying the whole cache twice per layer and token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llmkit.model.decoder import DecoderOutput

_COMPILED = "_llmkit_compiled_forward"


def fast_forward(model: nn.Module, compile: str | bool = "auto") -> Callable[..., DecoderOutput]:
    """The model's forward, as fast as measured to pay on this device; results equal the plain forward's up to
    float rounding (greedy tokens identical in fp32, tests/test_step.py).

    `compile`: "auto" (the default: no compilation; see the module notes), True (torch.compile the forward once per
    model and reuse it; warm-up is paid on the first calls) or False. A model in training mode is returned as it is,
    so nothing here changes a model that is still learning."""
    if compile not in ("auto", True, False):
        raise ValueError(f"compile must be 'auto', True or False, got {compile!r}")
    if model.training:
        return model
    decode_layout(model)
    if compile is True:
        if getattr(model, _COMPILED, None) is None:
            object.__setattr__(model, _COMPILED, torch.compile(model))  # not a submodule: state_dict unchanged
        return getattr(model, _COMPILED)
    return model


def decode_layout(model: nn.Module) -> int:
    """Store the model's float32 CPU Linear weights column-major (in place, once; later calls find them so and do
    nothing). Returns how many matrices moved. Values, shapes, parameters and tied weights are unchanged; training
    on such weights still works (the matmuls take either stride)."""
    moved = 0
    for mod in model.modules():
        if not isinstance(mod, nn.Linear):  # first: a quantised layer's `.weight` dequantises (model/quant.py)
            continue
        w = mod.weight
        if w.device.type != "cpu" or w.dtype != torch.float32:
            continue
        if w.dim() != 2 or w.stride() == (1, w.shape[0]):  # already column-major (or tied and moved)
            continue
        # The new storage is the same kind of tensor as the old: a plain one (training may use it later) even when
        # generate runs under inference mode, an inference tensor when the model was built under inference mode.
        with torch.inference_mode(w.is_inference()), torch.no_grad():
            w.data = w.data.t().contiguous().t()  # (out, in), strides (1, out)
        moved += 1
    return moved
