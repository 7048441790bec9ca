"""SparseGPT (Frantar & Alistarh, 2023): prune a layer and reconstruct the rest of its
weights from the inverse Hessian of its inputs, one column at a time (the GPTQ order)."""

from __future__ import annotations

import torch
from torch import Tensor


def inverse_hessian_cholesky(H: Tensor, percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = percdamp · mean diag(H); also the dead inputs."""
    H = H.clone().double()  # (in, in), H = 2XXᵀ/N
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(Hinv, upper=True).float(), dead


@torch.no_grad()
def sparsegpt_prune(W: Tensor, H: Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0,
                    blocksize: int = 128, percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Prune W and update its remaining weights to keep W X close (SparseGPT, Algorithm 1).

    Args:
        W: (out, in) weight.
        H: (in, in) Hessian 2XXᵀ/N of the layer's calibration inputs.
        sparsity: fraction removed (unstructured); used when n == 0.
        n, m: N:M pattern (keep n of every m consecutive inputs), e.g. 2, 4.
        blocksize: columns per lazy-update block; the adaptive mask is chosen per block.
        percdamp: dampening of H, fraction of its mean diagonal.

    Returns:
        (the new weight, its keep-mask), both (out, in).
    """
    W = W.clone().float()  # (out, in)
    rows, cols = W.shape
    Hinv, dead = inverse_hessian_cholesky(H, percdamp)  # (in, in), upper
    W[:, dead] = 0
    mask = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]  # (out, b), (b, b)
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        d = torch.diag(Hinv1)  # (b,)
        mask1 = torch.ones_like(W1, dtype=torch.bool)
        if n == 0:  # adaptive mask: the smallest w²/[H⁻¹]²_jj over the whole block (Eq. 7)
            k = int(W1.numel() * sparsity)
            if k:
                score = (W1**2 / d[None, :] ** 2).flatten()
                mask1.view(-1)[torch.argsort(score, stable=True)[:k]] = False
        for i in range(i2 - i1):
            if n and i % m == 0:  # N:M: choose within the next m columns, with the weights as updated so far
                score = W1[:, i : i + m] ** 2 / d[None, i : i + m] ** 2  # (out, m)
                drop = torch.argsort(score, dim=1, stable=True)[:, : m - n]
                mask1[:, i : i + m].scatter_(1, drop, False)
            w = W1[:, i]
            q = torch.where(mask1[:, i], w, torch.zeros_like(w))
            err = (w - q) / d[i]  # (out,)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # OBS update of the remaining columns
            Q1[:, i], Err1[:, i] = q, err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the later blocks
    return W, mask & ~dead[None, :]


def reconstruction_error(W: Tensor, W_new: Tensor, H: Tensor) -> float:
    """‖W X − W' X‖²_F / N expressed through H = 2XXᵀ/N: ½ tr(ΔW H ΔWᵀ)."""
    D = (W - W_new).float()  # (out, in)
    return 0.5 * torch.einsum("oi,ij,oj->", D, H.float(), D).item()
