"""GPTQ (Frantar et al., 2023, https://arxiv.org/abs/2210.17323): quantize one column at a time
and spread its error over the columns not yet quantized, weighted by the inverse Hessian of
the layer's reconstruction loss ‖WX - ŴX‖², H = 2XXᵀ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .formats import int_params


def gptq_quantize(W: Tensor, H: Tensor, bits: int = 4, group_size: int | None = 64, symmetric: bool = False,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ of one layer (Algorithm 1 with lazy batch updates and groups).

    Args:
        W: (out, in) weight.
        H: (in, in) Hessian 2XXᵀ/N of the layer's calibration inputs.
        group_size: columns per group (None: per channel); the last group may be shorter.
        damp: λ = damp · mean(diag H) added to the diagonal.
        block_size: columns per lazy batch update (B in the paper).
        act_order: quantize columns in order of decreasing diag(H) (groups keep their columns).

    Each group's grid is fitted on the weights before any GPTQ update ("static groups"), in
    either order. The original code fits a group's grid when its first column comes up, on
    weights already moved by the updates: a grid fitted to [min, max] of moved weights leaves the
    group's later columns, which move further, outside it, where they are clamped and their
    error compensated again; on SmolLM2 this made 4-bit g64 asymmetric GPTQ worse than RTN.

    Returns:
        q uint8 (out, in), scales and zeros float32 (out, n_groups): W ≈ s · (q - z).
    """
    W = W.detach().clone().float()  # (out, in)
    H = H.detach().clone().float()  # (in, in)
    out, d = W.shape
    g = d if group_size is None else min(group_size, d)
    dead = torch.diag(H) == 0  # inputs that never fire: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(d, device=W.device)
    scales, zeros = int_params(W, bits, g, symmetric)  # (out, n_groups): static groups, before any update
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(d, device=W.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (in, in)
    Q = torch.zeros(out, d, device=W.device)  # codes, permuted order
    order = perm.tolist()  # original column index of each position (a list: no tensor indexing in the loop)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(out, i2 - i1, device=W.device), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
            s, z = scales[:, col // g], zeros[:, col // g]  # (out,)
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s + z), 0, 2**bits - 1)
            Q[:, i1 + i] = q
            err = (w - s * (q - z)) / Hinv1[i, i]  # (out,)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the remaining columns
    q = torch.empty_like(Q)
    q[:, perm] = Q
    return q.to(torch.uint8), scales, zeros
