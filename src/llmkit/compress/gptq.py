"""GPTQ (Frantar et al. 2022): quantise a layer's weight column by column, moving each column's rounding error
onto the columns not yet quantised so that the layer's OUTPUT on calibration inputs X changes least.

The error that matters is ||W X^T - Q X^T||^2, whose Hessian in W's rows is H = 2 X^T X / n. Quantising column j
with error e_j is best compensated by W[:, j+1:] -= e_j / [H^-1]_jj * [H^-1]_{j, j+1:}; the upper Cholesky factor of
H^-1 gives those rows for all columns at once. Damping (a fraction of the mean diagonal added to H) keeps the
inverse stable; columns no input ever touched are zeroed. Blocks of 128 columns apply the updates lazily (one
matmul per block instead of one rank-1 update per column).

Blocks are processed in order and each block's inputs come from the blocks before it *already quantised* (the
reference implementation's sequential mode): later layers see, and compensate for, the earlier layers' error.
Group-wise int4 takes each group's scale and zero from the error-compensated weights when the group's first column
is reached. `act_order` quantises columns in order of decreasing H diagonal (the inputs that matter most first);
each group then keeps the grid computed from its own columns up front ("static groups") so the packed kernels'
contiguous groups still hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from llmkit.compress.rtn import int4_codes, int4_params, int8_codes, int8_scales, make_layer, rtn, set_module
from llmkit.model.quant import dequantize, pack_int4

BLOCK = 128


def gptq_weight(w: Tensor, H: Tensor, bits: int, group_size: int, damp: float = 0.01, act_order: bool = False,
                ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Quantise w (N, K) against Hessian H (K, K): (codes (N, K), scales, zeros or None) in the layouts `rtn`
    returns."""
    W = w.detach().float().clone()  # (N, K)
    N, K = W.shape
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    g = group_size if bits == 4 else K
    G = K // g
    S = torch.zeros(N, G) if bits == 4 else int8_scales(W)[:, None].repeat(1, 1)  # (N, G)
    Z = torch.zeros(N, G) if bits == 4 else None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    if act_order and bits == 4:  # static groups: each group's grid from its own (uncompensated) columns
        _, s0, z0 = rtn(W, 4, g)
        S, Z = s0, z0
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # (K, K) upper factor of H^-1
    Q = torch.zeros(N, K)
    step = BLOCK if BLOCK % g == 0 or bits == 8 else g
    for i1 in range(0, K, step):
        i2 = min(i1 + step, K)
        W1 = W[:, i1:i2].clone()  # (N, b)
        Err = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g
            if bits == 4 and not act_order and col % g == 0:  # a new group: its grid from the compensated weights
                S[:, grp], Z[:, grp] = int4_params(W1[:, i:i + g])  # type: ignore[index]
            w_col = W1[:, i]  # (N,)
            if bits == 8:
                q = int8_codes(w_col, S[:, 0])
                deq = q * S[:, 0]
            else:
                q = int4_codes(w_col, S[:, grp], Z[:, grp])  # type: ignore[index]
                deq = (q - 8) * S[:, grp] + Z[:, grp]  # type: ignore[index]
            Q[:, i1 + i] = q
            err = (w_col - deq) / Hinv1[i, i]  # (N,)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    Q = Q[:, inv]
    if bits == 8:
        return Q, S[:, 0], None
    return Q, S, Z


class _Stop(Exception):
    """Raised by the hook that captures the first block's inputs: nothing after it needs to run."""


def _first_block_inputs(model: nn.Module, ids: Tensor, batch_size: int) -> list[tuple[tuple, dict[str, Any]]]:
    """(args, kwargs) of blocks[0] for each calibration batch (the embeddings' output, rotary tables, mask)."""
    seen: list[tuple[tuple, dict[str, Any]]] = []

    def hook(_: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        seen.append((args, kwargs))
        raise _Stop

    h = model.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(ids), batch_size):
            try:
                model(ids[i:i + batch_size])
            except _Stop:
                pass
    finally:
        h.remove()
    return seen


def _block_hessians(block: nn.Module, inputs: list[tuple[tuple, dict[str, Any]]]) -> dict[str, Tensor]:
    """H = 2 X^T X / n for each Linear of `block`, X its inputs over every calibration batch."""
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    sums = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook_for(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # (rows, K)
            sums[name] += x.t() @ x  # (K, K)
            counts[name] += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] * (2 / max(counts[n], 1)) for n in linears}


@torch.no_grad()
def quantize_gptq(model: nn.Module, bits: int, group_size: int, ids: Tensor, damp: float = 0.01,
                  act_order: bool = False, batch_size: int = 8, quiet: bool = True) -> None:
    """GPTQ over every Transformer block in order, in place (Linear layers -> QuantLinear); ids (N, T)."""
    model.eval()
    inputs = _first_block_inputs(model, ids, batch_size)
    for block in tqdm(model.blocks, desc="GPTQ", unit="block", disable=quiet):
        for name, H in _block_hessians(block, inputs).items():
            lin = block.get_submodule(name)
            q, s, z = gptq_weight(lin.weight, H, bits, group_size, damp, act_order)
            set_module(block, name, make_layer(lin, bits, group_size, q, s, z))
        # The next block reads this block's output computed with its quantised weights.
        inputs = [((block(*args, **kwargs)[0], *args[1:]), kwargs) for args, kwargs in inputs]


def layer_error(w: Tensor, x: Tensor, q: Tensor, s: Tensor, z: Tensor | None) -> float:
    """Relative output error ||x W^T - x Q^T|| / ||x W^T|| of quantised codes on inputs x (rows, K)."""
    packed = q.to(torch.int8) if z is None else pack_int4(q)
    deq = dequantize(packed, s.to(torch.bfloat16), None if z is None else z.to(torch.bfloat16))
    ref = x @ w.float().t()
    return float(torch.linalg.norm(ref - x @ deq.t()) / max(float(torch.linalg.norm(ref)), math.ulp(1.0)))
