"""Weight-only quantised layers: what every verb needs to LOAD and RUN a model made by `llmkit quantize`.

Format (self-describing, inside an ordinary run folder's model.safetensors): a quantised Linear `name` stores
  int8:  `name.qweight` int8 (N, K), `name.scales` (N,)                     w = q * s           (per output row)
  int4:  `name.qweight` uint8 (N, K/2), `name.scales`, `name.zeros` (N, K/g)  w = (q - 8) * s + z (per group of g)
         two 4-bit codes per byte, the even column in the high nibble (the layout CUDA's packer takes)
and `name.bias` as before. A quantised embedding stores `embed.qweight` int8 (V, C) + `embed.scales` (V,): one
scale per token row, which is also the per-output-channel int8 of a tied output head, so the tied pair keeps one
copy. Scales and zeros are stored as bfloat16 (the kernels compute with bfloat16 scales; the quantiser rounds
them first, so the codes are exact for them); in memory they take the model's float dtype, like its other
floats. Bits and group size are read back from the tensors' dtypes and shapes: nothing else needs recording
(`llmkit quantize` also writes its settings into the folder's source.json, for people).

Kernels: PyTorch's own packed-weight matmuls. CPU: `torch._weight_int8pack_mm` and
`torch._weight_int4pack_mm_for_cpu` (weights re-packed once per device by `_convert_weight_to_int4pack_for_cpu`);
CUDA: `_weight_int8pack_mm` and `_weight_int4pack_mm` (`_convert_weight_to_int4pack`). They take bfloat16
activations: measured in torch 2.13 on an AVX2 CPU (no AVX-512), both CPU kernels are ~10x slower with float32
activations (a scalar path) than with bfloat16 ones, so activations are cast to bfloat16 around the kernel and the
result cast back. torchao 0.18 adds nothing on CPU: its int4 CPU path calls the same aten kernel, its int8
weight-only path dequantises and runs a float matmul, its int4 config needs the separate `mslk` package, and its
only compiled extensions are CUDA ones (they do not load into the CPU build of torch 2.13).

Code that reads `.weight` (evaluation's fused head + loss, the KV cache's dtype) gets the dequantised matrix,
computed on each access in the scales' dtype (the model's float dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.errors import CheckpointError

KERNEL_DTYPE = torch.bfloat16  # activations and scales as the packed kernels take them
CUDA_INNER_K_TILES = 8


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) codes 0..15 -> (N, K/2) uint8, two codes per byte, even column in the high nibble."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]  # (N, K/2)


def unpack_int4(packed: Tensor) -> Tensor:
    """(N, K/2) uint8 -> (N, K) int32 codes 0..15 (the inverse of pack_int4)."""
    hi, lo = (packed >> 4).to(torch.int32), (packed & 0xF).to(torch.int32)
    return torch.stack([hi, lo], dim=-1).reshape(packed.shape[0], -1)  # (N, K)


def dequantize(qweight: Tensor, scales: Tensor, zeros: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float (N, K) matrix a quantised weight stands for."""
    if qweight.dtype == torch.int8:
        return qweight.to(dtype) * scales.to(dtype)[:, None]  # (N, K)
    assert zeros is not None
    q = unpack_int4(qweight).to(dtype)  # (N, K)
    g = q.shape[1] // scales.shape[1]
    s = scales.to(dtype).repeat_interleave(g, dim=1)  # (N, K)
    z = zeros.to(dtype).repeat_interleave(g, dim=1)
    return (q - 8) * s + z


class QuantLinear(nn.Module):
    """A Linear layer whose weight is int8 (per output channel) or int4 (group-wise, with zero points)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 0, bias: bool = False,
                 ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if bits == 4 and (group_size < 2 or in_features % group_size or group_size % 2):
            raise ValueError(f"int4 group size {group_size} must be even and divide in_features {in_features}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else in_features
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(out_features))
            self.zeros: Tensor | None = None
        else:
            n_groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(out_features, n_groups))
            self.register_buffer("zeros", torch.zeros(out_features, n_groups))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._kernel: tuple | None = None  # (device, qweight version, packed weight, kernel scales) cache

    @property
    def weight(self) -> Tensor:
        """The dequantised (N, K) weight, recomputed on each access (for code that needs the matrix itself)."""
        return dequantize(self.qweight, self.scales, self.zeros, self.scales.dtype)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}"

    def _packed(self) -> tuple[Tensor, Tensor] | None:
        """The weight in the device kernel's layout and its scales (cached; rebuilt when the weight moves or
        changes); None where no packed kernel fits (then forward dequantises)."""
        dev = self.qweight.device
        key = (dev, self.qweight._version, self.qweight.data_ptr(), self.scales.data_ptr())
        if self._kernel is not None and self._kernel[0] == key:
            return self._kernel[1]
        packed: tuple[Tensor, Tensor] | None
        if self.bits == 8:
            packed = (self.qweight, self.scales.to(KERNEL_DTYPE))
        elif dev.type == "cpu" and self.out_features % 16 == 0:
            w = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(self.qweight), 1)
            sz = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1)  # (K/g, N, 2)
            packed = (w, sz.to(KERNEL_DTYPE).contiguous())
        elif dev.type == "cuda" and self.in_features % (CUDA_INNER_K_TILES * 16) == 0:
            w = torch._convert_weight_to_int4pack(self.qweight.contiguous(), CUDA_INNER_K_TILES)
            sz = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1)  # (K/g, N, 2)
            packed = (w, sz.to(KERNEL_DTYPE).contiguous())
        else:
            packed = None
        self._kernel = (key, packed)
        return packed

    def forward(self, x: Tensor) -> Tensor:
        packed = self._packed()
        if packed is None or x.device.type not in ("cpu", "cuda"):
            return F.linear(x, self.weight.to(x.dtype), self.bias)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)  # (M, K)
        w, s = packed
        if self.bits == 8:
            y = torch._weight_int8pack_mm(x2, w, s)  # (M, N)
        elif x.device.type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2, w, self.group_size, s)
        else:
            y = torch._weight_int4pack_mm(x2, w, self.group_size, s)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)  # (..., N)
        return y if self.bias is None else y + self.bias


class QuantEmbedding(nn.Module):
    """An embedding table stored int8 with one scale per token row; rows are dequantised as they are looked up."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(num_embeddings))

    @property
    def weight(self) -> Tensor:
        """The dequantised (V, C) table, recomputed on each access."""
        return dequantize(self.qweight, self.scales, None, self.scales.dtype)

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.qweight).to(self.scales.dtype)  # (..., C)
        return rows * self.scales[ids].unsqueeze(-1)


def is_quantized(weights: dict[str, Tensor]) -> bool:
    return any(k.endswith(".qweight") for k in weights)


def _swap(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """Replace each nn.Linear / nn.Embedding that has a `.qweight` in `weights` by its quantised twin, with the
    bits and group size the tensors' dtypes and shapes say."""
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    for name in sorted({k.removesuffix(".qweight") for k in weights if k.endswith(".qweight")}):
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"quantised tensor {name}.qweight names no layer of this model") from None
        q, s = weights[f"{name}.qweight"], weights.get(f"{name}.scales")
        if s is None:
            raise CheckpointError(f"quantised layer {name}: {name}.scales is missing")
        if isinstance(old, nn.Embedding):
            new: nn.Module = QuantEmbedding(old.num_embeddings, old.embedding_dim)
        elif isinstance(old, nn.Linear):
            bits = 8 if q.dtype == torch.int8 else 4
            group = old.in_features // s.shape[1] if bits == 4 and s.dim() == 2 else 0
            try:
                new = QuantLinear(old.in_features, old.out_features, bits, group, bias=old.bias is not None)
            except ValueError as e:
                raise CheckpointError(f"quantised layer {name}: {e}") from None
        else:
            raise CheckpointError(f"quantised tensor {name}.qweight names a {type(old).__name__}, not a Linear")
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, new)
    if tied and isinstance(getattr(model, "embed", None), QuantEmbedding) and isinstance(model.lm_head, nn.Linear):
        model.lm_head = QuantLinear(model.lm_head.in_features, model.lm_head.out_features, 8)
        tie_quantized(model)


def tie_quantized(model: nn.Module) -> None:
    """A tied output head reads the quantised embedding's own int8 rows and scales (one copy)."""
    emb, head = getattr(model, "embed", None), getattr(model, "lm_head", None)
    if isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear) and head.bits == 8:
        head.qweight, head.scales = emb.qweight, emb.scales


def load_quantized(model: nn.Module, weights: dict[str, Tensor], source: str) -> None:
    """Swap the quantised layers into `model` (built empty from the config) and adopt the tensors: what
    `load_model` does for a folder written by `llmkit quantize`."""
    from llmkit.model.weights import load_into

    _swap(model, weights)
    load_into(model, weights, source, assign=True)
    if getattr(model.cfg, "tie_embeddings", False):
        tie_quantized(model)


def dequantize_state(weights: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A quantised state dict as plain float weights under the usual names (`name.weight`): what exporters to
    formats without these layers (GGUF, a float run folder) start from. Floats are returned in `dtype`."""
    out: dict[str, Tensor] = {}
    for k, v in weights.items():
        if k.endswith(".qweight"):
            base = k.removesuffix(".qweight")
            out[base + ".weight"] = dequantize(v, weights[base + ".scales"], weights.get(base + ".zeros"), dtype)
        elif not k.endswith((".scales", ".zeros")):
            out[k] = v.to(dtype) if v.is_floating_point() else v
    return out
