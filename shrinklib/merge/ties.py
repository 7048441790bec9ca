"""TIES-merging: trim each task vector to its largest entries, elect a sign per entry, and
average only the entries that agree with it (Yadav et al., 2023,
https://arxiv.org/abs/2306.01708). TIES = task arithmetic + trim + sign election + disjoint mean."""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_weights
from .task_arithmetic import task_vector


def trim_magnitude(tau: Tensor, density: float) -> Tensor:
    """Keep the round(density · numel) entries of largest |τ| and zero the rest (step 1, "trim")."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    k = int(round(density * tau.numel()))
    if k >= tau.numel():
        return tau.clone()
    if k == 0:
        return torch.zeros_like(tau)
    mag = tau.abs()
    keep = mag >= mag.flatten().kthvalue(tau.numel() - k + 1).values  # |τ| at least the k-th largest
    if keep.sum() != k:  # ties at the threshold: keep exactly k by index
        keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
        keep[mag.flatten().topk(k).indices] = True
        keep = keep.view_as(tau)
    return tau * keep


def elect_sign(taus: Tensor) -> Tensor:
    """γ = sgn(Σ_i τ̂_i): the sign with the larger total mass per entry (step 2, "elect")."""
    return torch.sign(taus.sum(0))  # taus: (M, ...) -> (...)


def disjoint_mean(taus: Tensor, gamma: Tensor, weights: Tensor) -> Tensor:
    """Weighted mean over the models whose trimmed τ̂_i agrees with γ, per entry (step 3)."""
    agree = (torch.sign(taus) == gamma) & (taus != 0)  # (M, ...)
    w = weights.view(-1, *[1] * gamma.ndim)  # (M, 1, ...)
    num = (w * taus * agree).sum(0)
    den = (w * agree).sum(0)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))


def merge_ties(base: Tensor, tensors: list[Tensor], weights: list[float] | None = None, density: float = 0.2,
               scale: float = 1.0) -> Tensor:
    """θ = θ_base + λ · disjoint_mean(trim(τ_i), elect(trim(τ_i))).

    Args:
        base: the tensor of the shared starting model.
        tensors: the same tensor from each fine-tuned model.
        weights: per-model weights of the disjoint mean (default 1 each, as in the paper).
        density: fraction k of each task vector kept by the trim (the paper's default 0.2).
        scale: λ applied to the merged task vector (the paper uses 1 without validation).
    """
    weights = torch.tensor(check_weights(weights, len(tensors)), dtype=torch.float32, device=base.device)
    taus = torch.stack([trim_magnitude(task_vector(t, base), density) for t in tensors])  # (M, ...)
    weighted = taus * weights.view(-1, *[1] * base.ndim)
    gamma = elect_sign(weighted)
    tau_m = disjoint_mean(taus, gamma, weights)
    return (base.float() + scale * tau_m).to(base.dtype)
