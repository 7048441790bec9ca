"""SparseGPT (Frantar & Alistarh, 2023): prune a layer and reconstruct the rest of its
weights from the inverse Hessian of its inputs, one column at a time (the GPTQ order)."""

from __future__ import annotations

import torch
from torch import Tensor

from .masks import check_nm


def inverse_hessian_cholesky(H: Tensor, percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = percdamp · mean diag(H); also the dead inputs."""
    H = H.clone().float()  # (in, in), H = 2XXᵀ/N; float32 as in GPTQ (the damping keeps it well conditioned)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(Hinv, upper=True), dead


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
    if n:
        check_nm(cols, n, m, blocksize)  # as magnitude and Wanda: no partial group at the end
    Hinv, dead = inverse_hessian_cholesky(H, percdamp)  # (in, in), upper
    W[:, dead] = 0
    mask = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        # The block is held transposed, (b, out): the update after each column then touches
        # contiguous memory (one rank-1 `addr_`), which is what the column loop spends its time on.
        W1, Hinv1 = W[:, i1:i2].t().contiguous(), Hinv[i1:i2, i1:i2]  # (b, out), (b, b)
        Err1 = torch.zeros_like(W1)
        d = torch.diag(Hinv1)  # (b,)
        mask1 = torch.ones_like(W1, dtype=torch.bool)
        if n == 0:  # adaptive mask: the smallest w²/[H⁻¹]²_jj over the whole block (Eq. 7)
            k = int(W1.numel() * sparsity)
            if k:
                score = (W1**2 / d[:, None] ** 2).flatten()
                mask1.view(-1)[torch.argsort(score, stable=True)[:k]] = False
        for i in range(i2 - i1):
            if n and i % m == 0:  # N:M: choose within the next m columns, with the weights as updated so far
                score = W1[i : i + m] ** 2 / d[i : i + m, None] ** 2  # (m, out)
                drop = torch.argsort(score, dim=0, stable=True)[: m - n]
                mask1[i : i + m].scatter_(0, drop, False)
            err = torch.mul(W1[i], ~mask1[i], out=Err1[i]).div_(d[i])  # (w - q) / [H⁻¹]_ii, q = w or 0
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)  # OBS update of this and the remaining columns
        # column i is now q (kept: unchanged; pruned: w - err·[H⁻¹]_ii = 0 up to rounding, set exactly)
        W[:, i1:i2] = W1.masked_fill_(~mask1, 0).t()
        mask[:, i1:i2] = mask1.t()
        W[:, i2:] -= Err1.t() @ Hinv[i1:i2, i2:]  # lazy batch update of the later blocks
    return W, mask & ~dead[None, :]


def reconstruction_error(W: Tensor, W_new: Tensor, H: Tensor) -> float:
    """‖W X − W' X‖²_F / N expressed through H = 2XXᵀ/N: ½ tr(ΔW H ΔWᵀ)."""
    D = (W - W_new).float()  # (out, in)
    return 0.5 * torch.einsum("oi,ij,oj->", D, H.float(), D).item()
