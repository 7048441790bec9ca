"""GPTQ (Frantar et al., 2023, https://arxiv.org/abs/2210.17323): quantize one column at a time
and spread its error over the columns not yet quantized, weighted by the inverse Hessian of
the layer's reconstruction loss ‖WX - ŴX‖², H = 2XXᵀ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .formats import int_params, n_groups


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
    scales = torch.empty(out, n_groups(d, g), device=W.device)
    zeros = torch.empty_like(scales)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(d, device=W.device)
    if act_order:  # static groups: each group's grid is fitted before any update
        scales, zeros = int_params(W, bits, g, symmetric)
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
            if not act_order and col % g == 0:  # fit the group's grid on its current (updated) weights
                end = min(col + g, d)  # a short last group ends at d
                pending = W[:, i2:end] - Err1[:, :i] @ Hinv[i1 : i1 + i, i2:end]  # beyond this block, updated
                cols = torch.cat([W1[:, i : end - i1], pending], 1)  # (out, group length)
                s, z = int_params(cols, bits, cols.shape[1], symmetric)
                scales[:, col // g], zeros[:, col // g] = s[:, 0], z[:, 0]
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
