"""Pruning masks: which weights to keep. A mask is a bool tensor shaped like W, True = kept."""

from __future__ import annotations

import torch
from torch import Tensor


def _keep_largest(score: Tensor, n_prune: int) -> Tensor:
    """Mask of a 1-D or 2-D (per row) score with exactly `n_prune` smallest entries (per row) removed.

    Ties at the threshold go in index order (the earlier index is removed first), which is what a
    stable argsort would give; the k-th value plus a cumulative count finds it in linear time.
    """
    if n_prune <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    thr = torch.kthvalue(score, n_prune, dim=-1, keepdim=True).values  # the n_prune-th smallest
    below, tie = score < thr, score == thr
    ties_removed = n_prune - below.sum(-1, keepdim=True)  # how many of the ties go
    return ~(below | (tie & (tie.cumsum(-1) <= ties_removed)))


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def magnitude_mask(W: Tensor, sparsity: float, per: str = "layer") -> Tensor:
    """Keep the largest |W|: the `sparsity` fraction with the smallest magnitude is removed.

    Args:
        W: (out, in) weight.
        sparsity: fraction of weights removed, in [0, 1).
        per: "layer" (one threshold for the whole matrix, as in Han et al. 2015) or "row"
            (the same fraction in every output row, Wanda's comparison group).
    """
    check_sparsity(sparsity)
    score = W.abs().float()  # (out, in)
    if per == "layer":
        return _keep_largest(score.flatten(), int(score.numel() * sparsity)).view_as(W)
    if per == "row":
        return _keep_largest(score, int(score.shape[1] * sparsity))
    raise ValueError(f"per must be 'layer' or 'row', got {per!r}")


def wanda_score(W: Tensor, x_norm: Tensor) -> Tensor:
    """Wanda's importance S_ij = |W_ij| · ‖X_j‖₂ (Sun et al. 2023, Eq. 1). W (out, in), x_norm (in,)."""
    return W.abs().float() * x_norm.float()[None, :]  # (out, in)


def wanda_mask(W: Tensor, x_norm: Tensor, sparsity: float) -> Tensor:
    """Remove the `sparsity` fraction of each output row with the smallest |W|·‖X‖.

    Args:
        W: (out, in) weight.
        x_norm: (in,) ℓ2 norm of each input feature over the calibration tokens.
        sparsity: fraction removed in every row.
    """
    check_sparsity(sparsity)
    return _keep_largest(wanda_score(W, x_norm), int(W.shape[1] * sparsity))


def check_nm(cols: int, n: int, m: int, blocksize: int | None = None) -> None:
    """An N:M pattern fits `cols` inputs: 0 < n ≤ m and whole groups (no partial group at the end),
    none straddling two of SparseGPT's blocks of `blocksize` columns."""
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < n ≤ m, got {n}:{m}")
    if cols % m:
        raise ValueError(f"input size {cols} is not a multiple of m={m}: the last group of {cols % m} inputs "
                         f"cannot hold the {n}:{m} pattern; use an m that divides {cols}, or unstructured sparsity")
    if blocksize is not None and blocksize % m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of m={m} (a group may not straddle two blocks)")


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """N:M mask: in every group of m consecutive inputs of a row, keep the n highest scores.

    Args:
        score: (out, in) importance (|W| for magnitude, |W|·‖X‖ for Wanda); in % m == 0.
        n: weights kept per group (2 for 2:4).
        m: group size.
    """
    out, cols = score.shape
    check_nm(cols, n, m)
    groups = score.float().reshape(out, cols // m, m)  # (out, groups, m)
    return _keep_largest(groups, m - n).reshape(out, cols)


def sparsity_of(W: Tensor) -> float:
    """Fraction of exact zeros."""
    return (W == 0).sum().item() / W.numel()


def is_nm(W: Tensor, n: int, m: int) -> bool:
    """Whether every group of m consecutive inputs of every row has at most n nonzeros."""
    groups = (W != 0).reshape(W.shape[0], -1, m)
    return bool((groups.sum(-1) <= n).all())
